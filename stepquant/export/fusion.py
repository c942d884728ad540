"""What onnxruntime's CPU provider really runs: the operator counts of the graph it optimises (written
through `optimized_model_filepath`), and the check that every quantized convolution became an integer
kernel rather than DQ -> float Conv."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
from torch import nn

from stepquant.errors import StepquantError
from stepquant.quant.quantize import quantized_layers
from stepquant.runtime.onnxruntime_backend import graph_optimization_level

INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "QLinearAdd")


class FusionError(StepquantError, RuntimeError):
    """onnxruntime left quantized layers in float: the graph would be no faster than FP32."""


def optimized_op_counts(path: Path, optimization_level: str = "all") -> Counter:
    """Operator type -> count in the graph onnxruntime's CPU provider executes for `path`."""
    options = ort.SessionOptions()
    options.graph_optimization_level = graph_optimization_level(optimization_level)
    options.log_severity_level = 3  # its notes on initializers the optimiser dropped are not ours to show
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        # its tensors go to a file of their own, so a graph of any size can be written (only nodes are read)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.onnx.data"
        )
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


def check_integer_convs(path: Path, model: nn.Module) -> dict[str, int]:
    """Raise unless onnxruntime runs a QLinearConv for every quantized Conv of `model` (the fake-quant
    model `path` was exported from) and every quantized layer with a quantized output (the CPU profile's
    attention projections, run as 1x1 convolutions); return the integer kernel counts."""
    expected = sum(
        isinstance(layer.layer, nn.Conv2d) or layer.output_quantizer is not None for _, layer in quantized_layers(model)
    )
    counts = optimized_op_counts(path)
    kernels = {op: counts[op] for op in INTEGER_KERNELS if counts[op]}
    if counts["QLinearConv"] < expected:
        raise FusionError(
            f"{path.name}: onnxruntime fused {counts['QLinearConv']} of {expected} quantized convolutions "
            f"into QLinearConv (integer kernels found: {kernels or 'none'}); the rest run as float Conv"
        )
    return kernels
