"""Export an `EpsilonModel` (FP or fake-quant) to ONNX, with the axes its `ShapeProfile` declares dynamic.

Fake-quant layers carry their own ONNX symbolics (stepquant.quant.functional), so the exported graph
holds QuantizeLinear/DequantizeLinear with the calibrated constant scales and zero points of 0, and
integer weights behind DequantizeLinear. The TorchScript exporter is used because it honours those
symbolics exactly (modelopt exports its Q/DQ the same way).

Which quantizer module each Q/DQ node comes from is written to the model's metadata (QUANTIZER_MAP: node
name -> module name), for the layer-wise parity check; node names survive later rewrites (FP16), their
order does not.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import torch
from torch import nn

from stepquant.errors import StepquantError
from stepquant.export.onnx_files import save_onnx
from stepquant.export.shapes import ShapeProfile
from stepquant.quant.functional import QUANTIZER_ATTRIBUTE
from stepquant.quant.layers import ActivationQuantizer, WeightQuantizer

INPUT_NAMES = ("sample", "timestep")  # then the model's condition inputs
OUTPUT_NAME = "eps"
DEFAULT_OPSET = 17
QUANTIZER_MAP = "stepquant.quantizers"  # metadata key: JSON {Q/DQ node name: quantizer module name}


class OnnxExportError(StepquantError, RuntimeError):
    """The model could not be exported, or the exported graph is not valid ONNX."""


def _inline_identity_constants(graph: onnx.GraphProto) -> None:
    """Point consumers of `Identity(initializer)` at the initializer itself.

    The exporter deduplicates equal initializers (e.g. the shared input scale of to_q/to_k/to_v)
    into Identity nodes; TensorRT wants Q/DQ scales to be initializers, not computed tensors.
    """
    initializers = {init.name for init in graph.initializer}
    outputs = {out.name for out in graph.output}
    aliases = {
        node.output[0]: node.input[0]
        for node in graph.node
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs
    }
    if not aliases:
        return
    kept = [node for node in graph.node if not (node.op_type == "Identity" and node.output[0] in aliases)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in aliases:
                node.input[i] = aliases[name]
    del graph.node[:]
    graph.node.extend(kept)


@contextlib.contextmanager
def _named_quantizers(model: nn.Module) -> Iterator[None]:
    """Each quantizer tags the nodes it exports with its module name while the model is traced."""
    quantizers = [
        (name, m) for name, m in model.named_modules() if isinstance(m, (ActivationQuantizer, WeightQuantizer))
    ]
    for name, quantizer in quantizers:
        quantizer.export_name = name
    try:
        yield
    finally:
        for _, quantizer in quantizers:
            quantizer.export_name = None


def _move_quantizer_tags(model: onnx.ModelProto) -> None:
    """Take the quantizer tags off the Q/DQ nodes (no attribute of theirs) into the QUANTIZER_MAP metadata."""
    mapping = {}
    for node in model.graph.node:
        tags = [a for a in node.attribute if a.name == QUANTIZER_ATTRIBUTE]
        for tag in tags:
            mapping[node.name] = tag.s.decode()
            node.attribute.remove(tag)
    if mapping:
        del model.metadata_props[:]  # one export, one map
        onnx.helper.set_model_props(model, {QUANTIZER_MAP: json.dumps(mapping)})


def quantizer_map(model: onnx.ModelProto) -> dict[str, str] | None:
    """{Q/DQ node name: quantizer module name} of a graph exported here; None for other graphs."""
    entry = next((p.value for p in model.metadata_props if p.key == QUANTIZER_MAP), None)
    return None if entry is None else json.loads(entry)


def example_inputs(
    model: nn.Module, sample_shape: tuple[int, int, int], profile: ShapeProfile
) -> tuple[torch.Tensor, ...]:
    """Inputs of the profile's opt shape (batch 2, so no size-1 axis gets specialised) to trace with."""
    shapes = profile.input_shapes(sample_shape[0], model.conditions, ("opt",))
    return tuple(torch.ones((2, *shapes[name]["opt"][1:])) for name in (*INPUT_NAMES, *model.condition_names))


def trace_to_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict,
    opset: int = DEFAULT_OPSET,
    edit: Callable[[onnx.ModelProto], None] | None = None,
) -> None:
    """Trace `module` on `example` to `path` (TorchScript exporter), apply `edit` to the graph, save it (external
    data beside it, when large) and validate it with `onnx.checker` (full check, shape inference)."""
    path = Path(path)
    # the exporter writes a graph over 2 GB as one file per tensor: it writes into a directory of its own, and
    # the graph is saved from there to `path`
    traced = Path(tempfile.mkdtemp(prefix=f".{path.name[:64]}.", suffix=".export", dir=path.parent))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter
            torch.onnx.export(
                module.eval(),
                example,
                str(traced / path.name),
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        model_proto = onnx.load(str(traced / path.name))
        shutil.rmtree(traced)
        if edit is not None:
            edit(model_proto)
        save_onnx(model_proto, path)
        del model_proto
        onnx.checker.check_model(str(path), full_check=True)
    except (RuntimeError, onnx.checker.ValidationError, torch.onnx.errors.OnnxExporterError) as err:
        raise OnnxExportError(f"ONNX export to {path} failed: {err}") from err
    finally:
        shutil.rmtree(traced, ignore_errors=True)


def export_onnx(
    model: nn.Module,
    path: Path,
    sample_shape: tuple[int, int, int],
    opset: int = DEFAULT_OPSET,
    profile: ShapeProfile | None = None,
) -> None:
    """Write `model` to `path` and validate it with `onnx.checker` (full check, shape inference).

    `profile` (resolved) says which axes are dynamic; by default only the batch, which suits unconditional
    models; conditional ones need their sequence range."""
    profile = profile or ShapeProfile().resolved(sample_shape, None)
    if model.conditions and profile.sequence is None:
        raise ValueError("a conditional model's export needs a shape profile with its sequence range")

    def edit(model_proto: onnx.ModelProto) -> None:
        _move_quantizer_tags(model_proto)
        _inline_identity_constants(model_proto.graph)

    with _named_quantizers(model):
        trace_to_onnx(
            model,
            example_inputs(model, sample_shape, profile),
            path,
            [*INPUT_NAMES, *model.condition_names],
            [OUTPUT_NAME],
            profile.dynamic_axes(model.conditions),
            opset,
            edit,
        )
