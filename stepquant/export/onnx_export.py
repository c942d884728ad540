"""Export an `EpsilonModel` (FP or fake-quant) to ONNX, with the axes its `ShapeProfile` declares dynamic.

Fake-quant layers carry their own ONNX symbolics (stepquant.quant.functional), so the exported graph
holds QuantizeLinear/DequantizeLinear with the calibrated constant scales and zero points of 0, and
integer weights behind DequantizeLinear. The TorchScript exporter is used because it honours those
symbolics exactly (modelopt exports its Q/DQ the same way).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from stepquant.export.shapes import ShapeProfile

INPUT_NAMES = ("sample", "timestep")  # then the model's condition inputs
OUTPUT_NAME = "eps"
DEFAULT_OPSET = 17


class OnnxExportError(RuntimeError):
    """The model could not be exported, or the exported graph is not valid ONNX."""


def _inline_identity_constants(graph: onnx.GraphProto) -> None:
    """Point consumers of `Identity(initializer)` at the initializer itself.

    The exporter deduplicates equal initializers (e.g. the shared input scale of to_q/to_k/to_v)
    into Identity nodes; TensorRT wants Q/DQ scales to be initializers, not computed tensors.
    """
    initializers = {init.name for init in graph.initializer}
    outputs = {out.name for out in graph.output}
    aliases = {node.output[0]: node.input[0] for node in graph.node
               if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs}
    if not aliases:
        return
    kept = [node for node in graph.node if not (node.op_type == "Identity" and node.output[0] in aliases)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in aliases:
                node.input[i] = aliases[name]
    del graph.node[:]
    graph.node.extend(kept)


def example_inputs(model: nn.Module, sample_shape: tuple[int, int, int], profile: ShapeProfile) -> tuple[torch.Tensor, ...]:
    """Inputs of the profile's opt shape (batch 2, so no size-1 axis gets specialised) to trace with."""
    shapes = profile.input_shapes(sample_shape[0], model.conditions, ("opt",))
    return tuple(torch.ones((2, *shapes[name]["opt"][1:])) for name in (*INPUT_NAMES, *model.condition_names))


def export_onnx(model: nn.Module, path: Path, sample_shape: tuple[int, int, int], opset: int = DEFAULT_OPSET,
                profile: ShapeProfile | None = None) -> None:
    """Write `model` to `path` and validate it with `onnx.checker` (full check, shape inference).

    `profile` (resolved) says which axes are dynamic; by default only the batch, which suits unconditional
    models; conditional ones need their sequence range."""
    profile = profile or ShapeProfile().resolved(sample_shape, None)
    if model.conditions and profile.sequence is None:
        raise ValueError("a conditional model's export needs a shape profile with its sequence range")
    example = example_inputs(model, sample_shape, profile)
    dynamic = profile.dynamic_axes(model.conditions)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter
            torch.onnx.export(
                model.eval(),
                example,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[*INPUT_NAMES, *model.condition_names],
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
        model_proto = onnx.load(str(path))
        _inline_identity_constants(model_proto.graph)
        onnx.save(model_proto, str(path))
        onnx.checker.check_model(str(path), full_check=True)
    except (RuntimeError, onnx.checker.ValidationError, torch.onnx.errors.OnnxExporterError) as err:
        raise OnnxExportError(f"ONNX export to {path} failed: {err}") from err
