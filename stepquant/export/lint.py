"""TensorRT conformance lint for Q/DQ ONNX graphs.

Checks every rule the TensorRT ONNX parser enforces on QuantizeLinear/DequantizeLinear
(onnx-tensorrt's QuantDequantLinearHelper) and the placements that break TensorRT's Q/DQ fusions,
so a user learns of them before running trtexec. Each finding names the node and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from stepquant.export.onnx_files import infer_shapes

RULES: dict[str, str] = {
    "zero-point-nonzero": "TensorRT supports only symmetric quantization: every zero point must be 0",
    "zero-point-type": "the zero point's type selects the format and must be INT8, FLOAT8E4M3FN or INT4 (UINT8 is "
    "read as INT8)",
    "zero-point-missing": "an explicit zero point is needed: it selects INT8, FP8 or INT4",
    "scale-not-constant": "a scale must be a build-time constant (an initializer or a Constant node)",
    "scale-not-positive": "a scale must be positive and finite",
    "scale-shape": "a per-tensor scale must be a scalar; a per-channel scale must be 1-D with length dim[axis] of its "
    "input",
    "per-channel-activation": "per-channel (per-axis) quantization is supported for constant weights only",
    "input-type": "QuantizeLinear's input must be float32, float16 or bfloat16",
    "qdq-on-output": "a graph output must not be quantized: TensorRT fuses Q/DQ into the consumers of a tensor",
    "dangling-quantize": "every QuantizeLinear must feed DequantizeLinear nodes only",
    "residual-fusion": "Q/DQ between a Conv and the residual Add it feeds, with no other Conv input to fuse with, "
    "prevents TensorRT's Conv+Add fusion",
    "opset": "Q/DQ with per-channel scales needs opset 13 or newer, FP8 needs 19 or newer",
    "unsupported-op": "the graph holds an operator the TensorRT ONNX parser does not import",
}
FLOAT_INPUTS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
ZERO_POINT_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4}
UNSUPPORTED_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}


class LintError(ValueError):
    """A graph breaks a TensorRT rule; the message lists every finding."""


@dataclass(frozen=True)
class Finding:
    rule: str
    node: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.detail} ({RULES[self.rule]})"


class _Graph:
    """Lookups the rules share: constants, producers, consumers, element types and shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        try:
            model = infer_shapes(model)
        except Exception:  # shape inference is a help for the type rules, not a requirement
            pass
        self.model = model
        graph = model.graph
        self.constants = {init.name: init for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.types = {v.name: v.type.tensor_type for v in [*graph.input, *graph.value_info, *graph.output]}
        for name, tensor in self.constants.items():
            self.types.setdefault(name, onnx.TypeProto.Tensor(elem_type=tensor.data_type))
        self.outputs = {out.name for out in graph.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def constant(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def elem_type(self, name: str) -> int | None:
        tensor_type = self.types.get(name)
        return tensor_type.elem_type if tensor_type is not None and tensor_type.elem_type else None

    def dims(self, name: str) -> list[int | None] | None:
        if name in self.constants:
            return list(self.constants[name].dims)
        tensor_type = self.types.get(name)
        if tensor_type is None or not tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({', '.join(node.output)})"


def _on_weight(g: _Graph, node: onnx.NodeProto) -> bool:
    """Whether a Q or DQ node quantizes a constant (a weight), directly or through its Q partner."""
    data = node.input[0]
    if g.constant(data) is not None:
        return True
    producer = g.producer.get(data)
    return (
        node.op_type == "DequantizeLinear"
        and producer is not None
        and producer.op_type == "QuantizeLinear"
        and g.constant(producer.input[0]) is not None
    )


def _check_qdq_node(g: _Graph, node: onnx.NodeProto) -> list[Finding]:
    found: list[Finding] = []
    name = _label(node)
    data, scale_name = node.input[0], node.input[1]
    scale = g.constant(scale_name)
    if scale is None:
        found.append(Finding("scale-not-constant", name, f"scale {scale_name!r} is computed at run time"))
    elif not (np.isfinite(scale.astype(np.float64)).all() and (scale > 0).all()):
        found.append(
            Finding("scale-not-positive", name, f"scale {scale_name!r} holds {scale.min():g} .. {scale.max():g}")
        )
    if len(node.input) < 3 or not node.input[2]:
        found.append(Finding("zero-point-missing", name, "no zero point input"))
    else:
        zero_point_type = g.elem_type(node.input[2])
        zero_point = g.constant(node.input[2])
        if zero_point_type is not None and zero_point_type not in ZERO_POINT_TYPES:
            found.append(
                Finding("zero-point-type", name, f"zero point of type {TensorProto.DataType.Name(zero_point_type)}")
            )
        if zero_point is None:
            found.append(Finding("scale-not-constant", name, f"zero point {node.input[2]!r} is computed at run time"))
        elif np.any(zero_point.astype(np.float64) != 0):
            found.append(
                Finding(
                    "zero-point-nonzero",
                    name,
                    f"zero point {node.input[2]!r} holds {zero_point.flatten()[:4].tolist()}",
                )
            )
    if scale is not None and scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)  # ONNX's default axis is 1
        if not _on_weight(g, node):
            found.append(Finding("per-channel-activation", name, f"{scale.size} scales on the activation {data!r}"))
        dims = g.dims(data)
        if scale.ndim != 1:
            found.append(Finding("scale-shape", name, f"scale of shape {list(scale.shape)}"))
        elif dims is not None and -len(dims) <= axis < len(dims) and dims[axis] not in (None, scale.size):
            found.append(
                Finding("scale-shape", name, f"{scale.size} scales for dim[{axis}] = {dims[axis]} of {data!r}")
            )
        if g.opset < 13:
            found.append(Finding("opset", name, f"per-channel scales at opset {g.opset}"))
    elif scale is not None and scale.ndim > 1:
        found.append(Finding("scale-shape", name, f"per-tensor scale of shape {list(scale.shape)}"))
    if node.op_type == "QuantizeLinear":
        input_type = g.elem_type(data)
        if input_type is not None and input_type not in FLOAT_INPUTS:
            found.append(Finding("input-type", name, f"input {data!r} is {TensorProto.DataType.Name(input_type)}"))
        consumers = g.consumers.get(node.output[0], [])
        if any(c.op_type != "DequantizeLinear" for c in consumers):
            found.append(Finding("dangling-quantize", name, f"feeds {sorted({c.op_type for c in consumers})}"))
    if node.output[0] in g.outputs:
        found.append(Finding("qdq-on-output", name, f"graph output {node.output[0]!r}"))
    if len(node.input) > 2 and g.elem_type(node.input[2]) == TensorProto.FLOAT8E4M3FN and g.opset < 19:
        found.append(Finding("opset", name, f"FP8 Q/DQ at opset {g.opset}"))
    return found


def _check_residual_fusion(g: _Graph, node: onnx.NodeProto) -> list[Finding]:
    """Add(DQ(Q(Conv(...))), other) where no input comes straight from a Conv: the only convolution
    TensorRT could fuse the Add into sits behind Q/DQ. (A quantized *skip* input next to a direct Conv
    output is the placement TensorRT wants.)"""
    producers = [g.producer.get(name) for name in node.input]
    if any(p is not None and p.op_type == "Conv" for p in producers):
        return []
    found = []
    for dq in producers:
        q = g.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        conv = g.producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if conv is not None and conv.op_type == "Conv":
            found.append(
                Finding("residual-fusion", _label(q), f"between {_label(conv)} and the residual {_label(node)}")
            )
    return found


def lint(model: onnx.ModelProto | str | Path) -> list[Finding]:
    """Every TensorRT rule broken by `model` (an empty list means it conforms); a graph without any Q/DQ
    node is refused, since TensorRT's explicit quantization has nothing to check in it."""
    name = "the graph" if isinstance(model, onnx.ModelProto) else str(model)
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(str(model))
        except Exception as err:
            raise LintError(f"{model} is not a readable ONNX model: {err}") from err
    if not any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        detail = "no node at all" if not model.graph.node else "no QuantizeLinear or DequantizeLinear node"
        raise LintError(f"{name} has {detail}: it is not a quantized (Q/DQ) graph")
    g = _Graph(model)
    found: list[Finding] = []
    for node in g.model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            found += _check_qdq_node(g, node)
        elif node.op_type == "Add":
            found += _check_residual_fusion(g, node)
        elif node.op_type in UNSUPPORTED_OPS:
            found.append(Finding("unsupported-op", _label(node), node.op_type))
    return found


def check_conformance(model: onnx.ModelProto | str | Path) -> None:
    """Raise LintError listing every finding, if any."""
    found = lint(model)
    if found:
        raise LintError(f"{len(found)} TensorRT rule violation(s): " + "; ".join(map(str, found)))
