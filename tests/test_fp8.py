"""FP8 (E4M3) export: standard ONNX float8 Q/DQ at opset 19, lint-clean, and in parity with the torch
simulation quantizer by quantizer (the graph as written on onnxruntime); the sampler runs it at onnxruntime's
basic level."""

import numpy as np
import onnx
from onnx import TensorProto

from stepquant.bundle import load_bundle
from stepquant.export.lint import lint
from stepquant.export.parity import replay_parity
from stepquant.export.parity_policy import parity_policy
from stepquant.runtime.bundle_backends import quantized_backend


def test_fp8_graph_uses_float8_zero_points_and_weights(fp8_bundle):
    path, _ = fp8_bundle
    model = onnx.load(str(path / "model.onnx"))
    assert model.opset_import[0].version >= 19
    constants = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    weights = [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT8E4M3FN]
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(constants[n.input[2]].data_type == TensorProto.FLOAT8E4M3FN for n in qdq)
    weight_dq = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in {w.name for w in weights}]
    assert weights and len(weight_dq) == len(weights)  # every FP8 weight sits behind its DequantizeLinear
    assert lint(model) == []


def test_fp8_parity_with_the_torch_simulation(fp8_bundle):
    path, report = fp8_bundle
    assert report.parity_passed
    assert report.primary.layerwise[0].policy == parity_policy("tensorrt", "fp8", "fp32")
    bundle = load_bundle(path)
    assert bundle.target("tensorrt").onnxruntime_optimization_level == "basic"
    assert bundle.target("tensorrt").parity_optimization_level == "disable"  # judged as written, like INT8
    assert bundle.manifest.info["quantization"]["format"] == "fp8"
    assert replay_parity(bundle, "onnxruntime").passed
    assert quantized_backend(bundle).session.get_session_options().graph_optimization_level.name == "ORT_ENABLE_BASIC"
    assert np.isfinite(report.psnr_mean_db) and report.psnr_mean_db > 25
