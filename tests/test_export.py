"""The Q/DQ graph: node types, zero points, scales and integer weights equal to the calibrated ones."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import FEW_STEPS, run_cli
from onnx import numpy_helper

from stepquant.calibrators import calibrate_ranges, collect_calibration_set
from stepquant.export.layerwise import check_layerwise
from stepquant.export.onnx_export import export_onnx
from stepquant.export.parity_policy import parity_policy
from stepquant.models import EpsilonModel, load_model
from stepquant.models.torch_backend import TorchBackend
from stepquant.quant import QuantSpec, quantize_, quantized_layers
from stepquant.quant.quantize import ResidualQuantizer


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    loaded = load_model(str(tiny_model_dir))
    shape = (1, 8, 8)
    calib = collect_calibration_set(
        TorchBackend(EpsilonModel(loaded.denoiser)),
        loaded.scheduler_config,
        range(4),
        shape,
        FEW_STEPS,
        calib_steps=4,
        progress=False,
    )
    model = EpsilonModel(loaded.denoiser)
    quantize_(model, QuantSpec())
    calibrate_ranges(model, calib, progress=False)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, path, shape)
    return model, onnx.load(str(path)), path, tiny_model_dir


def _initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray:
    inits = _initializers(graph)
    if name in inits:
        return inits[name]
    node = next(n for n in graph.node if n.op_type == "Constant" and n.output[0] == name)
    return numpy_helper.to_array(node.attribute[0].t)


def test_every_quantized_layer_has_qdq_on_input_and_weight(exported):
    model, proto, _, _ = exported
    layers = dict(quantized_layers(model))
    residuals = [m for m in model.modules() if isinstance(m, ResidualQuantizer)]
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(residuals) == sum("Resnet" in type(m).__name__ for m in model.modules()) > 0  # one per ResNet block
    assert len(quantize) == len(layers) + len(residuals)  # layer inputs and residual skips, never outputs
    assert len(dequantize) == 2 * len(layers) + len(residuals)  # plus one weight DQ per layer


def test_residual_adds_get_qdq_on_the_skip_input_only(exported):
    _, proto, _, _ = exported
    producer = {out: node for node in proto.graph.node for out in node.output}
    adds = [
        n
        for n in proto.graph.node
        if n.op_type == "Add"
        and "/resnets." in n.name
        and any(
            producer.get(i) is not None and producer[i].op_type == "Conv" and "conv2" in producer[i].name
            for i in n.input
        )
    ]
    assert adds
    for add in adds:
        kinds = sorted(producer[i].op_type for i in add.input)
        assert kinds == ["Conv", "DequantizeLinear"], (add.name, kinds)  # conv2 direct, skip through Q/DQ
    plain = EpsilonModel(load_model(str(exported[3])).denoiser)
    assert quantize_(plain, QuantSpec(quantize_residuals=False))
    assert not [m for m in plain.modules() if isinstance(m, ResidualQuantizer)]
    assert proto.opset_import[0].version >= 17
    onnx.checker.check_model(proto, full_check=True)


def test_zero_points_are_int8_zeros(exported):
    _, proto, _, _ = exported
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = _constant(proto.graph, node.input[2])
            assert zero_point.dtype == np.int8 and not zero_point.any(), node.name


def _qdq_pairs(graph: onnx.GraphProto) -> dict[str, tuple[onnx.NodeProto, onnx.NodeProto]]:
    """For each Conv/MatMul/Gemm fed by Q/DQ: layer name -> (activation Q node, weight DQ node).

    Inputs are traced back through layout ops (Linear weights reach MatMul through a Transpose).
    """
    producer = {out: node for node in graph.node for out in node.output}

    def source(name: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape", "Identity"):
            node = producer.get(node.input[0])
        return node

    pairs = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        feeders = [source(name) for name in node.input[:2]]
        weight_dq = next(
            (
                f
                for f in feeders
                if f is not None
                and f.op_type == "DequantizeLinear"
                and f.input[0].endswith(".weight_quantizer.qweight")
            ),
            None,
        )
        act_dq = next(
            (f for f in feeders if f is not None and f.op_type == "DequantizeLinear" and f is not weight_dq), None
        )
        if weight_dq is not None and act_dq is not None:
            pairs[weight_dq.input[0].removesuffix(".weight_quantizer.qweight")] = (producer[act_dq.input[0]], weight_dq)
    return pairs


def test_scales_and_integer_weights_equal_calibrated_values(exported):
    model, proto, _, _ = exported
    pairs = _qdq_pairs(proto.graph)
    layers = dict(quantized_layers(model))
    assert set(pairs) == set(layers)  # layer names are the EpsilonModel's paths, e.g. unet.conv_in
    for name, layer in layers.items():
        act_q, weight_dq = pairs[name]
        assert act_q.op_type == "QuantizeLinear"
        np.testing.assert_array_equal(_constant(proto.graph, act_q.input[1]), layer.input_quantizer.scale.numpy())
        np.testing.assert_array_equal(_constant(proto.graph, weight_dq.input[1]), layer.weight_quantizer.scale.numpy())
        weight = _constant(proto.graph, weight_dq.input[0])
        assert weight.dtype == np.int8 and np.abs(weight).max() <= 127
        np.testing.assert_array_equal(weight, layer.weight_quantizer.qweight.numpy())
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("qweight")]
    assert weight_dq and all(a.name == "axis" and a.i == 0 for n in weight_dq for a in n.attribute)
    # excluded layers keep float weights
    assert _initializers(proto.graph)["unet.conv_in.weight"].dtype == np.float32


def test_graph_has_dynamic_batch_and_runs_on_onnxruntime(exported):
    model, _, path, _ = exported
    feeds = [
        {"sample": torch.randn(batch, 1, 8, 8).numpy(), "timestep": np.full((batch,), 321.0, np.float32)}
        for batch in (1, 3)
    ]
    report, outputs = check_layerwise(model, path, feeds, parity_policy("tensorrt", "int8", "fp32"))
    assert [o.shape for o in outputs] == [(1, 1, 8, 8), (3, 1, 8, 8)]
    assert report.passed, report.summary()


def test_a_profile_without_the_native_size_exports_at_its_opt_size(tmp_path):
    """A Jetson user exports only the smaller size they deploy: calibration, parity and the bundle's sample
    shape use the profile's opt size (the demo is 16 x 16; this profile holds 8 x 8 only)."""
    out = tmp_path / "small"
    result = run_cli(
        "export-quantized",
        "--out",
        out,
        "--height-range",
        "8",
        "--width-range",
        "8",
        "--steps",
        "4",
        "--calib-samples",
        "4",
        "--eval-samples",
        "4",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sample_shape"] == [1, 8, 8] and manifest["inputs"]["shape_profile"]["height"] == {
        "min": 8,
        "opt": 8,
        "max": 8,
    }
    sampled = run_cli(
        "stepquant", "sample", "--bundle", out, "--n", 2, "--steps", 4, "--out", tmp_path / "s.npz", "--no-progress"
    )
    assert sampled.returncode == 0, sampled.stderr
    assert np.load(tmp_path / "s.npz")["samples"].shape == (2, 1, 8, 8)
