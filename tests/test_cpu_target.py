"""The onnxruntime-cpu target: the same calibrated scales as the TensorRT graph, stored as UINT8 beside
INT8 weights, with output Q/DQ on every quantized Conv so onnxruntime fuses them into QLinearConv; the
bundle carries both graphs and each runtime picks its own."""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import pytest
import torch
from conftest import FEW_STEPS
from onnx import numpy_helper

from stepquant.bundle import BundleError, load_bundle
from stepquant.calibrators.data import CalibrationSet
from stepquant.calibrators.ranges import calibrate_ranges
from stepquant.export.config import CalibrationConfig, ChecksConfig
from stepquant.export.fusion import FusionError, check_integer_convs, optimized_op_counts
from stepquant.export.layerwise import check_layerwise
from stepquant.export.onnx_export import export_onnx
from stepquant.export.parity import parity_feeds, replay_parity
from stepquant.export.parity_policy import parity_policy
from stepquant.export.targets import TargetError, for_target
from stepquant.models import EpsilonModel, load_model
from stepquant.pipeline import ExportConfig, export_quantized
from stepquant.quant import QuantizedLayer, QuantSpec, quantize_
from stepquant.quant.quantize import ResidualQuantizer
from stepquant.runtime import OnnxRuntimeBackend
from stepquant.runtime.bundle_backends import quantized_backend


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir):
    """A tiny UNet at W8A8 with ranges calibrated on noise at three timesteps, and that data."""
    model = EpsilonModel(copy.deepcopy(load_model(str(tiny_model_dir)).denoiser))
    quantize_(model, QuantSpec())
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([900.0, 500.0, 100.0]).repeat_interleave(4)
    data = CalibrationSet(torch.randn((len(timesteps), 1, 8, 8), generator=generator), timesteps)
    calibrate_ranges(model, data, progress=False)
    return model, data


@pytest.fixture(scope="module")
def cpu_graph(calibrated, tmp_path_factory):
    """The calibrated model's onnxruntime-cpu profile (output ranges calibrated on the same data) and its graph."""
    model, data = calibrated
    cpu = for_target(model, "onnxruntime-cpu")
    calibrate_ranges(cpu, data, progress=False, only_uncalibrated=True)
    path = tmp_path_factory.mktemp("cpu") / "cpu.onnx"
    export_onnx(cpu, path, (1, 8, 8))
    return cpu, path


def _integer_layers(model) -> int:
    """Quantized convolutions plus attention projections: what the CPU graph runs as QLinearConv."""
    return sum(
        isinstance(m, QuantizedLayer) and (isinstance(m.layer, torch.nn.Conv2d) or m.output_quantizer is not None)
        for m in model.modules()
    )


def test_cpu_profile_keeps_the_scales_and_adds_conv_output_quantizers(calibrated):
    model, data = calibrated
    cpu = for_target(model, "onnxruntime-cpu")
    assert for_target(model, "tensorrt") is model
    layers = dict((n, m) for n, m in cpu.named_modules() if isinstance(m, QuantizedLayer))
    originals = dict((n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLayer))
    projections = {n for n in originals if re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)$", n)}
    assert len(projections) == 16  # the tiny UNet's four spatial self-attention layers (down, mid, two up)
    assert set(layers) == {n for n, m in originals.items() if isinstance(m.layer, torch.nn.Conv2d)} | projections
    assert all(
        isinstance(cpu.get_submodule(n), torch.nn.Linear)  # the time embedding's Linear layers
        for n, m in originals.items()
        if isinstance(m.layer, torch.nn.Linear) and n not in projections
    )
    for name, layer in layers.items():
        assert layer.input_quantizer.scale == originals[name].input_quantizer.scale
        assert layer.input_quantizer.grid.unsigned_storage and not originals[name].input_quantizer.grid.unsigned_storage
        assert layer.output_quantizer is not None and originals[name].output_quantizer is None
    assert not any(isinstance(m, ResidualQuantizer) for m in cpu.modules())
    assert any(isinstance(m, ResidualQuantizer) for m in model.modules())
    assert calibrate_ranges(cpu, data, progress=False, only_uncalibrated=True).keys() == {
        f"{n}.output_quantizer" for n in layers
    }


def test_cpu_graph_fuses_every_quantized_conv_and_matches_the_simulation(calibrated, cpu_graph, tmp_path):
    model, data = calibrated
    cpu, path = cpu_graph
    export_onnx(model, tmp_path / "trt.onnx", (1, 8, 8))
    graph = onnx.load(path).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants.update(
        {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    )
    activation_zero_points = [constants[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert activation_zero_points and all(z.dtype == np.uint8 and z == 128 for z in activation_zero_points)

    kernels = check_integer_convs(path, cpu)
    assert kernels["QLinearConv"] == _integer_layers(cpu)
    assert kernels["MatMulIntegerToFloat"] == 4  # Q·Kᵀ of each attention layer (all heads in one group)
    assert optimized_op_counts(tmp_path / "trt.onnx")["QLinearConv"] == 0  # why the TensorRT graph is slow here
    with pytest.raises(FusionError, match="into QLinearConv"):
        check_integer_convs(tmp_path / "trt.onnx", cpu)

    feeds = parity_feeds(data.samples[::4], data.timesteps[::4])
    report, _ = check_layerwise(cpu, path, feeds, parity_policy("onnxruntime-cpu", "int8", "fp32"))
    assert report.passed, report.summary()
    output_quantizers = [q for q in report.quantizers if q.name.endswith("output_quantizer")]
    assert len(output_quantizers) == _integer_layers(cpu) and all(q.codes > 0 for q in output_quantizers)


def test_a_dequantize_scale_two_percent_off_its_quantize_fails_the_cpu_graph(calibrated, cpu_graph, tmp_path):
    """A graph whose middle activation DQ disagrees with its Q by 2% (what a bad U8S8 rewrite would do)."""
    _, data = calibrated
    cpu, path = cpu_graph
    graph = onnx.load(path)
    constants = {i.name: i for i in graph.graph.initializer}
    dequantize = [
        n
        for n in graph.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[1] in constants
        and numpy_helper.to_array(constants[n.input[1]]).size == 1
    ]
    node = dequantize[len(dequantize) // 2]
    scale = numpy_helper.to_array(constants[node.input[1]]) * np.float32(1.02)
    graph.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), "faulty_scale"))
    node.input[1] = "faulty_scale"
    onnx.save(graph, tmp_path / "faulty.onnx")
    feeds = parity_feeds(data.samples[::4], data.timesteps[::4])
    faulty, _ = check_layerwise(cpu, tmp_path / "faulty.onnx", feeds, parity_policy("onnxruntime-cpu", "int8", "fp32"))
    assert not faulty.passed
    assert any("DequantizeLinear scale differs" in f for _, found in faulty.failures for f in found), faulty.summary()


def test_fp8_has_no_cpu_profile():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3))
    quantize_(model, QuantSpec(format="fp8", exclude=()))
    with pytest.raises(TargetError, match="int8"):
        for_target(model, "onnxruntime-cpu")
    with pytest.raises(ValueError, match="onnxruntime-cpu"):
        ExportConfig(targets=("onnxruntime-cpu",), quant=QuantSpec(format="fp8"))


def test_a_bundle_carries_a_graph_per_target_and_each_runtime_picks_its_own(tiny_model_dir, tmp_path):
    out = tmp_path / "both"
    report = export_quantized(
        ExportConfig(
            out=out,
            targets=("tensorrt", "onnxruntime-cpu"),
            sampler=FEW_STEPS,
            progress=False,
            calibration=CalibrationConfig(samples=8),
            checks=ChecksConfig(eval_samples=4),
        )
    )
    assert list(report.targets) == ["tensorrt", "onnxruntime-cpu"]
    assert report.targets["onnxruntime-cpu"].graphs == ["model_cpu.onnx"]
    bundle = load_bundle(out)
    cpu = bundle.target("onnxruntime-cpu")
    assert cpu.details["integer_kernels"]["QLinearConv"] > 0 and cpu.parity["passed"]
    assert cpu.parity["layerwise"][0]["policy"] == bundle.target("tensorrt").parity["layerwise"][0]["policy"]
    assert bundle.target("tensorrt").details["lint"]["findings"] == 0
    # both INT8 graphs judged as written, not as onnxruntime fuses them (a Q after a quantized Conv
    # becomes QLinearConv in a tensorrt graph too, e.g. with quantized shortcut convolutions)
    assert cpu.parity_optimization_level == bundle.target("tensorrt").parity_optimization_level == "disable"
    assert bundle.target_for("onnxruntime") == "onnxruntime-cpu" and bundle.target_for("tensorrt") == "tensorrt"
    backend = quantized_backend(bundle, threads=1)
    assert backend.model_path.name == "model_cpu.onnx"
    assert replay_parity(bundle).passed and replay_parity(bundle, target="tensorrt").passed

    only_trt = tmp_path / "trt"
    export_quantized(
        ExportConfig(
            model=str(tiny_model_dir),
            out=only_trt,
            sampler=FEW_STEPS,
            progress=False,
            calibration=CalibrationConfig(samples=4),
            checks=ChecksConfig(eval_samples=2),
        )
    )
    trt_bundle = load_bundle(only_trt)
    assert trt_bundle.target_for("onnxruntime") == "tensorrt"  # the TensorRT graph is the onnxruntime fallback
    with pytest.raises(BundleError, match="--target onnxruntime-cpu"):
        trt_bundle.target("onnxruntime-cpu")


def test_optimised_graph_cache_is_written_once_then_reused(calibrated, cpu_graph, tmp_path):
    _, data = calibrated
    _, path = cpu_graph
    first = OnnxRuntimeBackend(path, threads=1, cache_dir=tmp_path / "cache")
    second = OnnxRuntimeBackend(path, threads=1, cache_dir=tmp_path / "cache")
    assert not first.loaded_from_cache and second.loaded_from_cache
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".onnx"]  # no partial file left
    x, t = data.samples[:2], data.timesteps[:2]
    torch.testing.assert_close(first(x, t), second(x, t), rtol=0, atol=0)
