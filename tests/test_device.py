"""`--device` and `--dtype`: resolution and its one-line refusals (a one-GPU machine is simulated where there
is none), the FP reference in a lower float type on the CPU (the same code path a GPU takes: inputs moved and
cast by EpsilonModel, float32 answers), and, where CUDA is present, calibration on the GPU giving the CPU's
minmax scales and checking parity's torch side there. The CUDA tests skip cleanly without a GPU."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FEW_STEPS, TINY_UNET, assert_one_line_error, run_cli
from diffusers import UNet2DModel

from stepquant.calibrators import collect_calibration_set
from stepquant.calibrators.calibrate import calibrate_
from stepquant.export.config import CalibrationConfig, ChecksConfig
from stepquant.models import EpsilonModel, denoisers, load_model
from stepquant.models.device import (
    DeviceError,
    device_copy,
    ieee_float32,
    module_placement,
    place,
    resolve_device,
    resolve_placement,
)
from stepquant.models.torch_backend import TorchBackend
from stepquant.pipeline import ExportConfig, export_quantized
from stepquant.quant import QuantSpec, quantize_

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_auto_takes_the_gpu_when_there_is_one():
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(resolve_device("auto")) == expected
    assert resolve_placement("cpu", "bfloat16").dtype == torch.bfloat16


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_malformed_devices_are_refused(spec):
    with pytest.raises(DeviceError, match="--device must be auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


def test_a_gpu_index_this_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"--device cuda:7: this machine has 1 CUDA device \(cuda:0\)"):
        resolve_device("cuda:7")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path):
    result = run_cli("export-quantized", "--out", tmp_path / "b", "--device", "cuda", "--no-progress")
    assert_one_line_error(result, "--device cuda: torch sees no CUDA device")
    assert not (tmp_path / "b").exists()
    result = run_cli("export-quantized", "--out", tmp_path / "b", "--dtype", "float64", "--no-progress")
    assert result.returncode != 0 and "float64" in result.stderr


def test_a_lower_precision_reference_answers_in_float32_close_to_the_float32_one():
    torch.manual_seed(0)
    model = EpsilonModel(UNet2DModel(**TINY_UNET))
    low = EpsilonModel(place(copy.deepcopy(model.unet), torch.device("cpu"), torch.bfloat16))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        reference, out = model(x, t), low(x, t)
    assert out.dtype == torch.float32 and out.device == x.device
    assert 0 < (out - reference).abs().max() < 0.1 * reference.abs().max()


def test_a_device_copy_casts_a_new_model_and_leaves_the_source_alone():
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET)
    copied = device_copy(unet, torch.device("cpu"), torch.bfloat16)
    pairs = list(zip(unet.parameters(), copied.parameters()))
    assert len(pairs) == len(list(unet.parameters())) > 0
    for source, copy_ in pairs:
        assert source.dtype == torch.float32 and copy_.dtype == torch.bfloat16
        assert copy_.data_ptr() != source.data_ptr() and torch.equal(copy_, source.to(torch.bfloat16))


def test_float32_is_ieee_float32_inside_an_export_and_restored_after(monkeypatch, tiny_model_dir, tmp_path):
    """cuDNN convolutions default to TF32 on a GPU; an export switches them (and matmuls) to IEEE float32 for
    its whole run, calibration included, and puts the user's setting back."""
    import stepquant.pipeline as pipeline

    before = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    seen = []
    real = pipeline.calibrate_

    def calibrate_recording(*args, **kwargs):
        seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "calibrate_", calibrate_recording)
    export_quantized(
        ExportConfig(
            model=str(tiny_model_dir),
            out=tmp_path / "b",
            device="cpu",
            sampler=FEW_STEPS,
            progress=False,
            calibration=CalibrationConfig(samples=2),
            checks=ChecksConfig(eval_samples=2),
        )
    )
    assert seen == [("ieee", "ieee")]
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    with ieee_float32():
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == before[0]


def test_an_op_without_a_kernel_for_the_dtype_is_one_line(monkeypatch, tiny_model_dir, tmp_path):
    def no_half_kernel(model, sample, timestep, conditions):
        if sample.dtype == torch.float16:
            raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'")
        return model(sample, timestep, return_dict=False)[0]

    monkeypatch.setitem(
        denoisers.ARCHITECTURES,
        "UNet2DModel",
        denoisers.Architecture(UNet2DModel, "unet", lambda config: (), no_half_kernel),
    )
    result = run_cli(
        "export-quantized",
        "--model",
        tiny_model_dir,
        "--out",
        tmp_path / "b",
        "--device",
        "cpu",
        "--dtype",
        "float16",
        "--steps",
        2,
        "--calib-samples",
        2,
        "--no-progress",
    )
    assert_one_line_error(result, "--dtype float16 on cpu: \"slow_conv2d_cpu\" not implemented for 'Half'")
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())


def test_export_records_where_the_reference_ran(tiny_model_dir, tmp_path):
    result = run_cli(
        "export-quantized",
        "--model",
        tiny_model_dir,
        "--out",
        tmp_path / "b",
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
        "--steps",
        2,
        "--calib-samples",
        2,
        "--eval-samples",
        2,
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    calibration = json.loads((tmp_path / "b" / "manifest.json").read_text())["calibration"]
    assert (calibration["device"], calibration["fp_dtype"]) == ("cpu", "bfloat16")


@needs_cuda
@pytest.mark.parametrize("calibrator", ["minmax", "reconstruct"])
def test_cuda_calibration_matches_the_cpu(calibrator):
    """minmax: the same scales as the CPU (observers see the same activations up to float rounding);
    reconstruct: runs end to end on the GPU (its learned values differ by the GPU's arithmetic)."""
    from stepquant.calibrators.reconstruction import ReconstructionConfig

    loaded = load_model("demo-digits")
    fp = EpsilonModel(loaded.denoiser)
    data = collect_calibration_set(
        TorchBackend(fp), loaded.scheduler_config, range(4), (1, 16, 16), FEW_STEPS, 4, progress=False
    )
    scales = {}
    for device in ("cpu", "cuda"):
        q = EpsilonModel(copy.deepcopy(loaded.denoiser))
        quantize_(q, QuantSpec(4, 8))
        place(q, torch.device(device))
        reference = fp if device == "cpu" else EpsilonModel(place(copy.deepcopy(loaded.denoiser), torch.device(device)))
        with ieee_float32():  # as in an export: no TF32
            calibrate_(
                reference,
                q,
                data,
                calibrator,
                loaded.scheduler_config,
                FEW_STEPS,
                reconstruction=ReconstructionConfig(iters=5),
                progress=False,
            )
        scales[device] = {k: v.cpu() for k, v in q.state_dict().items() if k.endswith(".scale")}
    for name, cpu_scale in scales["cpu"].items():
        tolerance = 1e-5 if calibrator == "minmax" else 0.05
        assert torch.allclose(scales["cuda"][name], cpu_scale, rtol=tolerance), name


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_cuda_export_checks_parity_on_the_gpu(monkeypatch, tiny_model_dir, tmp_path, dtype):
    """Parity's torch side (the FP graph's reference, the fake-quant reference outputs and the layer-wise
    comparison) runs on the GPU in float32, whatever --dtype the FP reference has, and the gate passes."""
    import stepquant.pipeline as pipeline

    where = []
    for name in ("check_parity", "torch_outputs", "check_layerwise"):
        real = getattr(pipeline, name)
        monkeypatch.setattr(
            pipeline,
            name,
            lambda model, *a, _real=real, _name=name, **k: (
                where.append((_name, *module_placement(model))),
                _real(model, *a, **k),
            )[1],
        )
    report = export_quantized(
        ExportConfig(
            model=str(tiny_model_dir),
            out=tmp_path / "b",
            device="cuda",
            dtype=dtype,
            sampler=FEW_STEPS,
            progress=False,
            calibration=CalibrationConfig(samples=4),
            checks=ChecksConfig(eval_samples=4),
        )
    )
    assert report.fp_parity.passed and report.parity_passed
    assert {name for name, _, _ in where} == {"check_parity", "torch_outputs", "check_layerwise"}
    assert all(device.type == "cuda" and dtype_ == torch.float32 for _, device, dtype_ in where), where
    calibration = json.loads((tmp_path / "b" / "manifest.json").read_text())["calibration"]
    assert calibration["device"] == "cuda:0" and calibration["fp_dtype"] == dtype
    assert calibration["cuda_float32"] == "ieee (no TF32)" and isinstance(calibration["peak_gpu_memory_gib"], float)
