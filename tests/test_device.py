"""`--device` and `--dtype`: resolution and its one-line refusals (a one-GPU machine is simulated where there
is none), the FP reference in a lower float type on the CPU (the same code path a GPU takes: inputs moved and
cast by EpsilonModel, float32 answers), and, where CUDA is present, calibration on the GPU giving the CPU's
minmax scales. The CUDA tests skip cleanly without a GPU."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FEW_STEPS, TINY_UNET, assert_one_line_error, run_cli
from diffusers import UNet2DModel

from stepquant.calibrators import collect_calibration_set
from stepquant.calibrators.calibrate import calibrate_
from stepquant.models import EpsilonModel, denoisers, load_model
from stepquant.models.device import DeviceError, place, resolve_device, resolve_placement
from stepquant.models.torch_backend import TorchBackend
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


def test_an_op_without_a_kernel_for_the_dtype_is_one_line(monkeypatch, tiny_model_dir, tmp_path):
    def no_half_kernel(model, sample, timestep, conditions):
        if sample.dtype == torch.float16:
            raise RuntimeError('"slow_conv2d_cpu" not implemented for \'Half\'')
        return model(sample, timestep, return_dict=False)[0]

    monkeypatch.setitem(denoisers.ARCHITECTURES, "UNet2DModel",
                        denoisers.Architecture(UNet2DModel, "unet", lambda config: (), no_half_kernel))
    result = run_cli("export-quantized", "--model", tiny_model_dir, "--out", tmp_path / "b", "--device", "cpu",
                     "--dtype", "float16", "--steps", 2, "--calib-samples", 2, "--no-progress")
    assert_one_line_error(result, "--dtype float16 on cpu: \"slow_conv2d_cpu\" not implemented for 'Half'")
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())


def test_export_records_where_the_reference_ran(tiny_model_dir, tmp_path):
    result = run_cli("export-quantized", "--model", tiny_model_dir, "--out", tmp_path / "b", "--device", "cpu",
                     "--dtype", "bfloat16", "--steps", 2, "--calib-samples", 2, "--eval-samples", 2, "--no-progress")
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
    data = collect_calibration_set(TorchBackend(fp), loaded.scheduler_config, range(4), (1, 16, 16), FEW_STEPS, 4,
                                   progress=False)
    scales = {}
    for device in ("cpu", "cuda"):
        q = EpsilonModel(copy.deepcopy(loaded.denoiser))
        quantize_(q, QuantSpec(4, 8))
        place(q, torch.device(device))
        reference = fp if device == "cpu" else EpsilonModel(place(copy.deepcopy(loaded.denoiser), torch.device(device)))
        calibrate_(reference, q, data, calibrator, loaded.scheduler_config, FEW_STEPS,
                   reconstruction=ReconstructionConfig(iters=5), progress=False)
        scales[device] = {k: v.cpu() for k, v in q.state_dict().items() if k.endswith(".scale")}
    for name, cpu_scale in scales["cpu"].items():
        tolerance = 1e-5 if calibrator == "minmax" else 0.05
        assert torch.allclose(scales["cuda"][name], cpu_scale, rtol=tolerance), name
