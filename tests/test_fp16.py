"""`--precision fp16`: FP16 compute and FP16 Q/DQ scales (what strongly typed FP16 engines need),
FP32 inputs and outputs, the timestep encoding kept in FP32, lint-clean, and in parity on onnxruntime."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from stepquant.export.lint import lint
from stepquant.export.parity_policy import parity_policy
from stepquant.export.precision import timestep_encoding_nodes
from stepquant.pipeline import ExportConfig
from stepquant.quant import QuantSpec


def test_scales_and_compute_are_fp16_with_fp32_io(fp16_bundle):
    path, report = fp16_bundle
    model = onnx.load(str(path / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in qdq)
    assert {v.type.tensor_type.elem_type for v in model.graph.input} == {TensorProto.FLOAT}
    assert {v.type.tensor_type.elem_type for v in model.graph.output} == {TensorProto.FLOAT}
    assert not [i for i in inits.values() if i.data_type == TensorProto.FLOAT and i.name.endswith(".scale")]
    assert lint(model) == []
    assert report.parity_passed and report.primary.layerwise[0].policy == parity_policy("tensorrt", "int8", "fp16")
    assert np.isfinite(report.psnr_mean_db) and report.psnr_mean_db > 30


def test_no_cast_is_left_casting_fp16_to_fp16(fp16_bundle):
    """onnxruntime 1.30 refuses an FP16 graph whose Cast(FP16 -> FP16) feeds an op it runs in FP32 (Sqrt)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp16_bundle[0] / "model.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert casts and not [n.name for n in casts if types.get(n.input[0]) == n.attribute[0].i == TensorProto.FLOAT16]


def test_the_timestep_encoding_stays_fp32(fp16_bundle):
    model = onnx.load(str(fp16_bundle[0] / "model.onnx"))
    kept = timestep_encoding_nodes(model.graph)
    sines = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert sines and all(n.name in kept for n in sines)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    assert all(types.get(n.output[0], TensorProto.FLOAT) == TensorProto.FLOAT for n in sines)


def test_the_simulation_uses_the_fp16_scales(fp16_bundle):
    import torch

    from stepquant.quant.layers import ActivationQuantizer
    from stepquant.quant.quantize import round_scales_

    quantizer = ActivationQuantizer(QuantSpec().act_grid)
    quantizer.set_amax(1.2345678)
    round_scales_(torch.nn.Sequential(quantizer), torch.float16)
    assert float(quantizer.scale) == float(np.float16(1.2345678 / 127))
    model = onnx.load(str(fp16_bundle[0] / "model.onnx"))
    scales = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("input_quantizer.scale")]
    assert scales and all(s.dtype == np.float16 for s in scales)


def test_fp16_precision_is_for_int8_bundles():
    with pytest.raises(ValueError, match="fp16 is for int8"):
        ExportConfig(precision="fp16", quant=QuantSpec(format="fp8"))
    with pytest.raises(ValueError, match="unknown precision"):
        ExportConfig(precision="bf16")
