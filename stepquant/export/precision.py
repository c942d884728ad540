"""`--precision fp16`: the Q/DQ graph's floating-point compute and its Q/DQ scales in FP16, as a strongly
typed TensorRT FP16 engine needs them (the graph's types are its precisions); inputs and outputs stay FP32."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto
from torch import nn

from stepquant.export.onnx_export import export_onnx
from stepquant.export.onnx_files import infer_shapes, save_onnx
from stepquant.export.shapes import ShapeProfile

PRECISIONS = ("fp32", "fp16")
FP16_OPSET = 19  # FP16 Q/DQ scales need opset 19


def timestep_encoding_nodes(
    graph: onnx.GraphProto, timestep_input: str = "timestep", stop: str = "time_embedding"
) -> list[str]:
    """Nodes from the timestep input up to (not into) the time-embedding MLP: the sinusoidal encoding.

    sin(t * f) for t up to 1000 needs FP32: FP16's spacing near 1000 is 0.5, which scrambles the phases.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, None] = {}
    frontier = [timestep_input]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if stop in node.name or node.name in found:
                continue
            found[node.name] = None
            frontier.extend(node.output)
    return list(found)


def export_at_precision(
    model: nn.Module,
    path: Path,
    sample_shape: tuple[int, int, int],
    precision: str,
    opset: int,
    profile: ShapeProfile | None = None,
) -> None:
    """`export_onnx`, then for `precision` fp16 the FP16 rewrite (the model's scales already rounded to FP16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    export_onnx(
        model, path, sample_shape, opset=max(opset, FP16_OPSET) if precision == "fp16" else opset, profile=profile
    )
    if precision == "fp16":
        convert_to_fp16(path)


def convert_to_fp16(path: Path) -> None:
    """Rewrite the ONNX file at `path` in FP16 (onnxconverter-common), keeping FP32 inputs and outputs
    and the timestep encoding.

    The converter retypes tensors and wraps the ops it keeps in FP32 with its own Casts, but leaves the
    graph's own Cast(to=FLOAT) nodes, which would turn FP16 tensors back to FP32: those are retargeted,
    and dropped where their input is FP16 already (an FP16 -> FP16 Cast before an op the CPU provider runs
    in FP32 breaks onnxruntime 1.30's cast insertion: "Type (tensor(float)) ... does not match").
    """
    from onnxconverter_common.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    keep_fp32 = timestep_encoding_nodes(model.graph)
    own_casts = {
        n.name
        for n in model.graph.node
        if n.name not in keep_fp32
        and n.op_type == "Cast"
        and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)
    }
    # the converter's own shape inference would serialize the weights (over 2 GiB for SDXL's graphs): ours does not
    model = convert_float_to_float16(
        infer_shapes(model), keep_io_types=True, node_block_list=keep_fp32, disable_shape_infer=True
    )
    outputs = {out.name for out in model.graph.output}
    for node in model.graph.node:
        if node.name in own_casts and node.output[0] not in outputs:
            for attribute in node.attribute:
                if attribute.name == "to":
                    attribute.i = TensorProto.FLOAT16
    del model.graph.value_info[:]
    save_onnx(_without_identity_casts(infer_shapes(model), own_casts), str(path))


def _without_identity_casts(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """`model` (shapes inferred) without those of the named Cast nodes whose input already has the type
    they cast to; their consumers read the input instead, and the inferred types stay right."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({init.name: init.data_type for init in graph.initializer})
    outputs = {out.name for out in graph.output}
    identities = {
        node.output[0]: node.input[0]
        for node in graph.node
        if node.name in names
        and node.output[0] not in outputs
        and types.get(node.input[0]) == next(a.i for a in node.attribute if a.name == "to")
    }
    kept = [node for node in graph.node if node.output[0] not in identities]
    for node in kept:
        node.input[:] = [identities.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)
    kept_info = [info for info in graph.value_info if info.name not in identities]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    return model
