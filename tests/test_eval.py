"""Evaluation metrics have the properties they must have, and the evaluation runs end to end."""

import copy
import math

import pytest
import torch
from safetensors import safe_open

from stepquant.calibrators import calibrate_ranges, collect_calibration_set
from stepquant.data.digits import held_out_split, load_digits_16
from stepquant.eval.classifier import WEIGHTS, load_classifier
from stepquant.eval.evaluate import evaluate
from stepquant.eval.metrics import PSNR_CAP_DB, frechet_distance, psnr
from stepquant.eval.plots import plot_errors
from stepquant.models import EpsilonModel, load_model
from stepquant.models.torch_backend import TorchBackend
from stepquant.quant import QuantSpec, quantize_
from stepquant.runtime import SamplerConfig


def test_psnr_of_identical_sets_is_capped_and_matches_hand_value():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert torch.equal(psnr(x, x), torch.full((4,), PSNR_CAP_DB))
    # an error of 0.02 everywhere: PSNR = 10 log10(2^2 / 0.02^2) = 40 dB
    assert psnr(x + 0.02, x) == pytest.approx(torch.full((4,), 40.0), abs=1e-3)
    with pytest.raises(ValueError, match="shape"):
        psnr(x, x[:2])


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_noise():
    torch.manual_seed(0)
    features = torch.randn(500, 16) @ torch.randn(16, 16)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    broken = features.clone()
    broken[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite features"):
        frechet_distance(broken, features)
    distances = [frechet_distance(features + s * torch.randn_like(features), features) for s in (0.1, 0.5, 1.0, 2.0)]
    assert distances == sorted(distances) and distances[0] > 0
    # two Gaussians with identity covariance and means 3 apart in one dimension: FD = 9 (+ sampling noise)
    a, b = torch.randn(20000, 2), torch.randn(20000, 2) + torch.tensor([3.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(9.0, rel=0.05)


def test_a_coloured_digit_of_one_colour_gives_an_empty_mask_and_finite_scores():
    from stepquant.data.coloured_digits import digit_masks, read_colours
    from stepquant.eval.text_to_image import judge_coloured_digits

    flat = torch.full((2, 3, 32, 32), 0.3)  # both colours read alike: nothing to tell the strokes by
    flat[1] = -0.8
    fg, bg = read_colours(flat)
    assert torch.equal(fg, bg) and torch.isfinite(digit_masks(flat)).all()
    digit, colour, features = judge_coloured_digits(flat, [(7, 0, 1, 0), (3, 2, 4, 1)])
    assert colour == 0.0 and torch.isfinite(features).all()


def test_classifier_held_out_accuracy_is_at_least_95_percent():
    images, labels = load_digits_16()
    _, held_out = held_out_split(len(images))
    with safe_open(str(WEIGHTS), "pt") as handle:
        recorded = float(handle.metadata()["held_out_accuracy"])
    with torch.no_grad():
        accuracy = (load_classifier()(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(recorded, abs=1e-4)


@pytest.fixture(scope="module")
def demo_backends():
    loaded = load_model("demo-digits")
    fp = EpsilonModel(loaded.denoiser)
    config = SamplerConfig(steps=5)
    calib = collect_calibration_set(
        TorchBackend(fp), loaded.scheduler_config, range(100, 104), (1, 16, 16), config, 5, progress=False
    )
    quantized = {}
    for bits in (8, 4):
        model = EpsilonModel(copy.deepcopy(loaded.denoiser))
        quantize_(model, QuantSpec(bits, bits))
        calibrate_ranges(model, calib, progress=False)
        quantized[bits] = TorchBackend(model)
    return TorchBackend(fp), quantized, loaded.scheduler_config, config


def test_evaluating_fp_against_itself_gives_no_error(demo_backends):
    fp, _, schedule, config = demo_backends
    result = evaluate(fp, fp, schedule, range(8), (1, 16, 16), config, batch_size=4, progress=False)
    assert result.psnr_to_fp_db == PSNR_CAP_DB and result.label_agreement == 1.0
    assert result.fd_to_fp == pytest.approx(0.0, abs=1e-6)
    assert max(result.step_error) == 0.0 and max(result.accumulated_error) == 0.0
    assert len(result.timesteps) == len(result.step_error) == len(result.accumulated_error) == 5


def test_fewer_bits_give_larger_errors(demo_backends, tmp_path):
    fp, quantized, schedule, config = demo_backends
    w8, w4 = (evaluate(fp, quantized[b], schedule, range(8), (1, 16, 16), config, progress=False) for b in (8, 4))
    assert w8.psnr_to_fp_db > w4.psnr_to_fp_db
    assert w8.fd_to_fp < w4.fd_to_fp
    assert sum(w8.step_error) < sum(w4.step_error) and w8.accumulated_error[-1] < w4.accumulated_error[-1]
    assert all(math.isfinite(v) for v in w4.step_error + w4.accumulated_error)
    plot_errors(w4, tmp_path / "errors.png")
    assert (tmp_path / "errors.png").stat().st_size > 1000
