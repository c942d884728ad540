"""Class-conditional models sampled with classifier-free guidance: the class table behind `--classes`, every
calibrator and correction on a tiny class-conditional model, the trajectory calibrators stepping exactly as
the guided sampler does, and corrections fitted to the guided estimate the sampler uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from stepquant.bundle import load_bundle
from stepquant.calibrators.calibrate import CALIBRATORS, calibrate_
from stepquant.calibrators.corrections import estimate_corrections
from stepquant.calibrators.data import collect_calibration_set
from stepquant.calibrators.multistep import _step
from stepquant.calibrators.reconstruction import ReconstructionConfig
from stepquant.models import EpsilonModel, load_model
from stepquant.models.conditioning import load_conditioning
from stepquant.models.denoisers import sample_shape
from stepquant.models.loading import CONDITIONAL_DEMO_NAME
from stepquant.models.schedulers import capture_table
from stepquant.models.tiny import save_tiny_pipeline
from stepquant.models.torch_backend import TorchBackend
from stepquant.quant import QuantSpec, quantize_
from stepquant.quant.layers import ActivationQuantizer
from stepquant.runtime import SamplerConfig, sample
from stepquant.runtime.bundle_backends import bundle_corrections
from stepquant.runtime.guidance import ConditioningError

GUIDED = SamplerConfig(steps=4, guidance_scale=3.0)
FAST = ReconstructionConfig(iters=2, batch_size=4, trajectory_iters=2, trajectory_batch=2)
CLASSES = 4


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    """(pipeline dir, LoadedModel, EpsilonModel, conditioning of every class) of a tiny class-conditional UNet."""
    root = save_tiny_pipeline(
        "sd", tmp_path_factory.mktemp("classes") / "pipeline", classes=CLASSES, in_channels=1, out_channels=1
    )
    loaded = load_model(str(root))
    model = EpsilonModel(loaded.denoiser)
    return root, loaded, model, load_conditioning(model, loaded, None, None, sample_shape(loaded.denoiser))


@pytest.fixture(scope="module")
def guided_calibration(class_model):
    _, loaded, model, rows = class_model
    return collect_calibration_set(
        TorchBackend(model),
        loaded.scheduler_config,
        range(3),
        (1, 8, 8),
        GUIDED,
        GUIDED.steps,
        progress=False,
        conditioning=rows,
    )


def test_class_table_rows_and_bad_classes(class_model, tiny_model_dir, tmp_path):
    root, loaded, model, every = class_model
    assert loaded.class_table is not None and not loaded.latent  # a class-conditional pixel model
    assert len(every) == CLASSES
    picked = load_conditioning(model, loaded, None, None, (1, 8, 8), classes=(2, 0))
    states = picked.cond["encoder_hidden_states"]
    np.testing.assert_array_equal(states, every.cond["encoder_hidden_states"][[2, 0]])
    np.testing.assert_array_equal(picked.uncond["encoder_hidden_states"], every.uncond["encoder_hidden_states"])
    with pytest.raises(ConditioningError, match="class 4 is out of range: the model's class table has 4 classes"):
        load_conditioning(model, loaded, None, None, (1, 8, 8), classes=(1, 4))
    with pytest.raises(ConditioningError, match="give one of --prompts-file, --conditioning and --classes"):
        load_conditioning(model, loaded, tmp_path / "prompts.txt", None, (1, 8, 8), classes=(1,))
    text = load_model(str(save_tiny_pipeline("sd", tmp_path / "sd")))
    with pytest.raises(ConditioningError, match="has no class table"):
        load_conditioning(EpsilonModel(text.denoiser), text, None, None, (4, 8, 8), classes=(1,))
    plain = load_model(str(tiny_model_dir))
    with pytest.raises(ConditioningError, match="is unconditional: drop --classes"):
        load_conditioning(EpsilonModel(plain.denoiser), plain, None, None, (1, 8, 8), classes=(1,))


def test_guided_calibration_pairs_the_halves_of_each_state(guided_calibration):
    states = guided_calibration.sampler_states()
    assert len(guided_calibration) == 2 * len(states) == 2 * 3 * GUIDED.steps
    pairs = guided_calibration.pairs
    torch.testing.assert_close(guided_calibration.samples[pairs[:, 0]], guided_calibration.samples[pairs[:, 1]])
    every = states.batch(torch.arange(len(states)))
    assert not torch.equal(every.unconditional["encoder_hidden_states"], every.conditions["encoder_hidden_states"])


def test_multistep_steps_exactly_as_the_guided_sampler(class_model, guided_calibration):
    """One unrolled step from a recorded state lands on the state the guided sampler recorded next; without
    guidance (the fault this catches) it does not."""
    _, loaded, model, _ = class_model
    table = capture_table(GUIDED, loaded.scheduler_config)
    states = guided_calibration.sampler_states()
    now, after = (states.at_timestep(float(table.timesteps[i])) for i in (0, 1))
    with torch.no_grad():
        start, landed = states.batch(now), states.batch(after).samples
        stepped = _step(model, table, start, start.samples, 0)
        torch.testing.assert_close(stepped, landed, rtol=1e-4, atol=1e-5)
        start.guidance_scale = 1.0
        unguided = _step(model, table, start, start.samples, 0)
    assert not torch.allclose(unguided, landed, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("calibrator", CALIBRATORS)
def test_every_calibrator_runs_on_a_guided_class_model(class_model, guided_calibration, calibrator):
    _, loaded, model, _ = class_model
    q_model = EpsilonModel(load_model(str(class_model[0])).denoiser)
    quantize_(q_model, QuantSpec(4, 8))
    summary = calibrate_(
        model,
        q_model,
        guided_calibration,
        calibrator,
        loaded.scheduler_config,
        GUIDED,
        reconstruction=FAST,
        progress=False,
    )
    assert summary["calibrator"] == calibrator
    scales = [m.scale for m in q_model.modules() if isinstance(m, ActivationQuantizer)]
    assert scales and all(torch.isfinite(s).all() and (s > 0).all() for s in scales)
    if calibrator in ("multistep", "mixed-order"):
        assert np.isfinite(summary["trajectory_loss"])


class _BranchBias:
    """A 'quantized' backend: the FP one with a bias on each half of a guided call (unconditional first)."""

    def __init__(self, backend, uncond_bias: float, cond_bias: float) -> None:
        self.backend, self.biases = backend, (uncond_bias, cond_bias)

    def __call__(self, sample_, timestep, **conditions):
        out = self.backend(sample_, timestep, **conditions)
        half = len(out) // 2
        return np.concatenate([out[:half] + self.biases[0], out[half:] + self.biases[1]]).astype(np.float32)


@pytest.mark.parametrize("method", ["ptqd", "d2-deterministic"])
def test_corrections_fitted_to_the_guided_estimate_undo_branch_biases(class_model, method):
    """Biases b_u, b_c on the two halves move the guided estimate by (1 - g) b_u + g b_c: terms fitted to the
    guided estimate remove it; terms pooled over the branches (the per-branch fit) cannot."""
    _, loaded, model, rows = class_model
    fp = TorchBackend(model)
    faulty = _BranchBias(fp, 0.05, -0.08)
    seeds, shape, schedule = range(4), (1, 8, 8), loaded.scheduler_config
    table = capture_table(GUIDED, schedule)

    def run(backend, terms=None):
        return sample(
            backend, table, seeds, shape, GUIDED, progress=False, conditioning=rows, corrections=terms, clip=False
        ).samples

    reference, uncorrected = run(fp), run(faulty)
    guided = estimate_corrections(method, fp, faulty, schedule, range(10, 16), shape, GUIDED, False, rows)
    pooled = estimate_corrections(
        method, fp, faulty, schedule, range(10, 16), shape, GUIDED, False, rows, per_branch=True
    )
    error = {
        name: float(np.abs(run(faulty, terms) - reference).max())
        for name, terms in (("guided", guided), ("pooled", pooled))
    }
    assert float(np.abs(uncorrected - reference).max()) > 0.05
    assert error["guided"] < 2e-3 < error["pooled"], error


def test_tac_fits_gains_along_the_guided_trajectory(class_model):
    _, loaded, model, rows = class_model
    fp = TorchBackend(model)
    for per_branch in (False, True):
        terms = estimate_corrections(
            "tac",
            fp,
            _BranchBias(fp, 0.02, 0.02),
            loaded.scheduler_config,
            range(4),
            (1, 8, 8),
            GUIDED,
            False,
            rows,
            per_branch=per_branch,
        )
        assert terms.method == "tac" and np.isfinite(terms.gain).all() and len(terms.timesteps) == GUIDED.steps


def test_class_bundle_export_sample_and_bad_input(class_model, tmp_path):
    root = class_model[0]
    out = tmp_path / "bundle"
    result = run_cli(
        "export-quantized",
        "--model",
        root,
        "--out",
        out,
        "--classes",
        "1,3",
        "--guidance-scale",
        "2",
        "--steps",
        "3",
        "--calib-samples",
        "2",
        "--eval-samples",
        "2",
        "--correction",
        "ptqd",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    manifest = load_bundle(out).manifest
    assert manifest.sample_space == "pixel" and manifest.class_table in manifest.files
    assert manifest.info["conditioning"]["source"] == "classes 1, 3"
    assert manifest.info["correction_fit"] == "guided estimate"
    per_branch = tmp_path / "per-branch"
    result = run_cli(
        "export-quantized",
        "--model",
        root,
        "--out",
        per_branch,
        "--classes",
        "1,3",
        "--guidance-scale",
        "2",
        "--steps",
        "3",
        "--calib-samples",
        "2",
        "--eval-samples",
        "2",
        "--correction",
        "ptqd",
        "--correction-per-branch",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert load_bundle(per_branch).manifest.info["correction_fit"] == "per branch"
    guided_terms, branch_terms = (bundle_corrections(load_bundle(b)) for b in (out, per_branch))
    assert not np.allclose(guided_terms.bias, branch_terms.bias)  # fitted to other statistics
    samples = tmp_path / "s.npz"
    result = run_cli(
        "stepquant", "sample", "--bundle", out, "--classes", "2,0", "--n", "3", "--out", samples, "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    values = np.load(samples)["samples"]
    assert values.shape == (3, 1, 8, 8) and np.abs(values).max() <= 1.0  # pixels: clipped
    assert "guidance 2" in result.stdout
    assert_one_line_error(
        run_cli("stepquant", "eval", "--bundle", out, "--n", "4", "--out", tmp_path / "eval"),
        "scores 16x16 grey digits",
    )
    bad = {
        ("--classes", "4"): "class 4 is out of range",
        ("--classes", "a,1"): "'a' is not a class index",
        ("--classes", "1", "--conditioning", tmp_path / "c.safetensors"): "give one of",
        ("--steps", "5"): "stores no 5 DDIM steps",
        ("--scheduler", "euler"): "EULER steps sampler; it stores",
    }
    for args, fragment in bad.items():
        assert_one_line_error(
            run_cli("stepquant", "sample", "--bundle", out, "--n", "2", "--out", tmp_path / "x.npz", *args), fragment
        )
    assert_one_line_error(
        run_cli("export-quantized", "--out", tmp_path / "d", "--classes", "1"), "is unconditional: drop --classes"
    )
    assert_one_line_error(
        run_cli(
            "export-quantized",
            "--out",
            tmp_path / "d",
            "--correction",
            "ptqd",
            "--guidance-scale",
            "2",
            "--correction-per-branch",
        ),
        "is unconditional: drop --correction-per-branch",
    )
    assert_one_line_error(
        run_cli(
            "export-quantized",
            "--model",
            root,
            "--out",
            tmp_path / "e",
            "--classes",
            "1",
            "--prompts-file",
            tmp_path / "p.txt",
        ),
        "give one of",
    )
    for args in (
        ("--correction-per-branch",),
        ("--correction", "ptqd", "--correction-per-branch", "--guidance-scale", "1"),
    ):
        assert_one_line_error(
            run_cli("export-quantized", "--model", root, "--out", tmp_path / "f", *args), "--correction-per-branch fits"
        )
    assert not any((tmp_path / name).exists() for name in ("x.npz", "d", "e", "f"))


@pytest.mark.slow
def test_bundled_conditional_demo_draws_the_requested_digit(tmp_path):
    """demo-digits-cond: at most 10 MB of weights, ten classes, and guided FP samples (guidance 3, 25 DDIM
    steps) that the project's classifier reads as the requested digit at least 95% of the time."""
    from stepquant.eval.classifier import load_classifier
    from stepquant.eval.evaluate import evaluate

    loaded = load_model(CONDITIONAL_DEMO_NAME)
    weights = sum(p.stat().st_size for p in (loaded.class_table.parents[1] / "unet").glob("*.safetensors"))
    assert weights <= 10 * 2**20
    model = EpsilonModel(loaded.denoiser)
    config = SamplerConfig("ddim", 25, 0.0, 3.0)
    every = load_conditioning(model, loaded, None, None, (1, 16, 16))
    assert len(every) == 10
    seeds = range(100)
    images = sample(
        TorchBackend(model),
        capture_table(config, loaded.scheduler_config),
        seeds,
        (1, 16, 16),
        config,
        progress=False,
        conditioning=every,
    ).samples
    with torch.no_grad():
        read = load_classifier()(torch.from_numpy(images)).argmax(1).numpy()
    assert (read == np.arange(100) % 10).mean() >= 0.95
    fp = TorchBackend(model)
    quick = SamplerConfig("ddim", 5, 0.0, 3.0)
    same = evaluate(
        fp,
        fp,
        loaded.scheduler_config,
        range(20),
        (1, 16, 16),
        quick,
        progress=False,
        conditioning=every,
        requested=[i % 10 for i in range(20)],
    )
    assert same.class_accuracy == same.fp_class_accuracy > 0.5 and same.step_error == [0.0] * 5
    result = run_cli(
        "stepquant",
        "sample",
        "--model",
        CONDITIONAL_DEMO_NAME,
        "--classes",
        "7",
        "--n",
        "2",
        "--steps",
        "5",
        "--guidance-scale",
        "3",
        "--out",
        tmp_path / "sevens.png",
        "--no-progress",
    )
    assert result.returncode == 0 and (tmp_path / "sevens.png").is_file(), result.stderr
