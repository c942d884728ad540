"""Correction terms: each estimator recovers known terms from synthetic data built with them, the variance
schedule never goes negative, the host loop applies them, and bad correction files are refused."""

import numpy as np
import pytest
import torch

from stepquant.calibrators.corrections import ErrorStatistics, d2, ptqd, tac_gain
from stepquant.export.config import CalibrationConfig, ChecksConfig, CorrectionConfig
from stepquant.models.demo_config import SCHEDULER_CONFIG
from stepquant.models.schedulers import capture_table
from stepquant.runtime.corrections import CorrectionError, Corrections
from stepquant.runtime.sampler import SamplerConfig, sample
from stepquant.runtime.seeding import seed_generators

TIMESTEPS = [900, 500, 100]


def synthetic(k: float, bias: list[float], noise: float, batches: int = 20) -> ErrorStatistics:
    """eps_q = (1 + k) eps + b_c + noise, streamed in batches."""
    torch.manual_seed(0)
    stats = ErrorStatistics(TIMESTEPS, channels=len(bias))
    b = torch.tensor(bias).reshape(1, -1, 1, 1)
    for _ in range(batches):
        for t in TIMESTEPS:
            eps = torch.randn(16, len(bias), 8, 8)
            stats.update(t, eps.numpy(), ((1 + k) * eps + b + noise * torch.randn_like(eps)).numpy())
    return stats


def test_ptqd_recovers_gain_bias_and_residual_variance():
    k, bias, noise = 0.2, [0.05, -0.1], 0.1
    terms = ptqd(synthetic(k, bias, noise))
    assert terms.gain == pytest.approx(np.full((3, 2), 1 / (1 + k)), abs=2e-3)
    assert terms.bias == pytest.approx(-np.broadcast_to(bias, (3, 2)) / (1 + k), abs=3e-3)
    assert terms.residual_var.tolist() == pytest.approx([noise**2 / (1 + k) ** 2] * 3, rel=0.05)
    # corrected estimate = eps + noise / (1 + k): the systematic part is gone
    eps = np.random.default_rng(0).standard_normal((4, 2, 8, 8), dtype=np.float32)
    corrected = terms.correct_estimate((1 + k) * eps + np.reshape(bias, (1, -1, 1, 1)), 500, seed_generators(range(4)))
    assert np.allclose(corrected, eps, atol=5e-3)


def test_ptqd_ignores_a_negative_correlation():
    assert ptqd(synthetic(-0.2, [0.0], 0.0)).gain == pytest.approx(np.ones((3, 1)))


def test_d2_recovers_the_conditional_mean_and_variance():
    k, bias, noise = 0.2, [0.1], 0.3
    deterministic, stochastic = d2(synthetic(k, bias, noise), False), d2(synthetic(k, bias, noise), True)
    # q = (1+k) e + b + n, d = k e + b + n with var(e) = 1: analytic regression of d on q
    var_q, cov_qd, var_d = (1 + k) ** 2 + noise**2, k * (1 + k) + noise**2, k**2 + noise**2
    slope = cov_qd / var_q
    conditional = var_d - cov_qd**2 / var_q
    assert deterministic.gain == pytest.approx(np.full((3, 1), 1 - slope), abs=3e-3)
    assert deterministic.residual_var.tolist() == pytest.approx([conditional] * 3, rel=0.03)
    assert stochastic.noise_std.tolist() == pytest.approx([conditional**0.5] * 3, rel=0.02)
    assert stochastic.residual_var.tolist() == [0.0] * 3 and deterministic.noise_std.tolist() == [0.0] * 3
    # the conditional mean of the error is removed: the corrected estimate's mean is eps's mean (0)
    mean_q = bias[0]  # E[q] with E[eps] = 0
    assert np.abs(deterministic.gain * mean_q + deterministic.bias).max() < 5e-3


def test_tac_gain_inverts_a_per_channel_scale():
    torch.manual_seed(0)
    stats = ErrorStatistics([500], channels=2)
    eps = torch.randn(32, 2, 8, 8)
    stats.update(500, eps.numpy(), (eps * torch.tensor([1.25, 0.8]).reshape(1, -1, 1, 1)).numpy())
    assert tac_gain(stats, shrinkage=0.0)[0] == pytest.approx(torch.tensor([0.8, 1.25]), rel=1e-5)
    assert (tac_gain(stats, shrinkage=10.0)[0] - 1).abs().max() < (tac_gain(stats, 0.0)[0] - 1).abs().max()


class _FixedThenRandom:
    """A noise stream whose first draw (the initial noise) is fixed and whose later draws (the sampler's
    per-step noise) come from `seed`."""

    def __init__(self, seed: int) -> None:
        self.first, self.rest = True, np.random.default_rng(seed)

    def standard_normal(self, size, dtype=np.float32):
        if self.first:
            self.first = False
            return np.ones(size, dtype=dtype)
        return self.rest.standard_normal(size, dtype=dtype)


def test_variance_schedule_calibration_shrinks_the_samplers_noise_and_never_goes_negative():
    terms = Corrections.identity([500], 1, method="ptqd")
    terms.residual_var[:] = 0.5
    assert terms.sampler_noise_std(500, 0.0, 1.0) == 0.0  # a deterministic step stays deterministic
    assert terms.sampler_noise_std(500, 0.7, 0.4) == pytest.approx((0.49 - 0.16 * 0.5) ** 0.5)
    terms = Corrections.identity([500], 1, method="ptqd")  # terms are cached per step once used: a fresh set
    terms.residual_var[:] = 1e9
    assert terms.sampler_noise_std(500, 0.7, 0.4) == 0.0  # clamped at 0, never negative

    def backend(x, t):
        return 0.1 * x

    for config in (SamplerConfig("ddim", 10, 1.0), SamplerConfig("ddpm", 10)):
        table = capture_table(config, SCHEDULER_CONFIG)
        huge = Corrections.identity([int(t) for t in table.timesteps], 1, method="ptqd")
        huge.residual_var[:] = 1e9
        runs = [
            sample(
                backend,
                table,
                [0, 1],
                (1, 4, 4),
                config,
                progress=False,
                corrections=terms_,
                noise_streams=lambda seeds, o=offset: [_FixedThenRandom(o + s) for s in seeds],
            ).samples
            for terms_ in (huge, None)
            for offset in (0, 100)
        ]
        assert np.isfinite(runs[0]).all() and np.array_equal(
            runs[0], runs[1]
        )  # no sampler noise left: the streams do not matter
        assert not np.array_equal(runs[2], runs[3])  # without the terms they do


def test_identity_terms_leave_the_loop_unchanged_and_terms_must_cover_the_timesteps():
    def backend(x, t):
        return 0.1 * x

    config = SamplerConfig("ddim", 5, 1.0)
    table = capture_table(config, SCHEDULER_CONFIG)
    timesteps = [int(t) for t in table.timesteps]
    plain = sample(backend, table, range(3), (1, 4, 4), config, progress=False).samples
    identity = sample(
        backend, table, range(3), (1, 4, 4), config, progress=False, corrections=Corrections.identity(timesteps, 1)
    ).samples
    assert np.allclose(plain, identity, atol=1e-6)
    ten = SamplerConfig("ddim", 10, 0.0)
    with pytest.raises(CorrectionError, match="no correction terms for timestep"):
        sample(
            backend,
            capture_table(ten, SCHEDULER_CONFIG),
            range(3),
            (1, 4, 4),
            ten,
            progress=False,
            corrections=Corrections.identity(timesteps, 1),
        )


def test_bad_correction_files_are_refused(tmp_path):
    terms = Corrections.identity([900, 500], 2, method="ptqd")
    terms.save(tmp_path / "ok.safetensors")
    assert Corrections.load(tmp_path / "ok.safetensors").method == "ptqd"
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CorrectionError, match="cannot read"):
        Corrections.load(tmp_path / "garbage.safetensors")
    with pytest.raises(CorrectionError, match="cannot read"):
        Corrections.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"timesteps": torch.tensor([1])}, str(tmp_path / "partial.safetensors"), metadata={"method": "ptqd"})
    with pytest.raises(CorrectionError, match="lacks correction terms"):
        Corrections.load(tmp_path / "partial.safetensors")
    with pytest.raises(CorrectionError, match="must not be negative"):
        Corrections(
            "ptqd",
            torch.tensor([1]),
            torch.ones(1, 1),
            torch.zeros(1, 1),
            torch.zeros(1),
            -torch.ones(1),
            torch.zeros(1, 1),
        )
    with pytest.raises(CorrectionError, match="unknown correction method"):
        Corrections(
            "magic",
            torch.tensor([1]),
            torch.ones(1, 1),
            torch.zeros(1, 1),
            torch.zeros(1),
            torch.zeros(1),
            torch.zeros(1, 1),
        )


@pytest.fixture(scope="module")
def corrected_bundle(tmp_path_factory):
    from conftest import FEW_STEPS

    from stepquant.pipeline import ExportConfig, export_quantized
    from stepquant.quant import QuantSpec

    out = tmp_path_factory.mktemp("corrected") / "bundle"
    export_quantized(
        ExportConfig(
            out=out,
            quant=QuantSpec(4, 8),
            sampler=FEW_STEPS,
            progress=False,
            calibration=CalibrationConfig(samples=8),
            checks=ChecksConfig(eval_samples=4, require_parity=False),
            correction=CorrectionConfig(method="ptqd"),
        )
    )
    return out


def test_export_writes_terms_keyed_by_the_sampler_timesteps(corrected_bundle):
    from stepquant.bundle import load_bundle
    from stepquant.runtime.bundle_backends import bundle_corrections

    bundle = load_bundle(corrected_bundle)
    terms = bundle_corrections(bundle)
    assert terms.method == "ptqd" and bundle.manifest.correction_method == "ptqd"
    assert terms.timesteps.tolist() == bundle.manifest.info["correction_timesteps"] == [750, 500, 250, 0]
    assert (terms.gain > 0).all() and (terms.residual_var >= 0).all()


def test_the_cli_applies_terms_and_refuses_other_step_counts(corrected_bundle, tmp_path):
    import numpy as np
    from conftest import run_cli

    def run(*args):
        return run_cli("stepquant", *args)

    base = ("sample", "--bundle", corrected_bundle, "--n", "2", "--no-progress")
    assert run(*base, "--out", tmp_path / "with.npz").returncode == 0
    assert run(*base, "--no-corrections", "--out", tmp_path / "without.npz").returncode == 0
    with_terms, without = np.load(tmp_path / "with.npz")["samples"], np.load(tmp_path / "without.npz")["samples"]
    assert not np.array_equal(with_terms, without)
    refused = run(*base, "--steps", "10", "--out", tmp_path / "x.npz")
    assert refused.returncode == 1 and "stores no 10 DDIM steps" in refused.stderr
    assert not (tmp_path / "x.npz").exists()
    shown = run("inspect", "--bundle", corrected_bundle, "--plot", tmp_path / "terms.png")
    assert shown.returncode == 0 and "ptqd correction terms of ddim:4 for 4 timesteps" in shown.stdout
    assert (tmp_path / "terms.png").stat().st_size > 1000


def test_added_estimate_noise_does_not_shift_the_samplers_own_noise():
    def backend(x, t):
        return 0.1 * x

    config = SamplerConfig("ddim", 5, 1.0)
    table = capture_table(config, SCHEDULER_CONFIG)
    terms = Corrections.identity([int(t) for t in table.timesteps], 1, method="d2-stochastic")
    terms.noise_std[:] = 1e-4
    plain = sample(backend, table, range(3), (1, 4, 4), config, progress=False).samples
    noisy = sample(backend, table, range(3), (1, 4, 4), config, progress=False, corrections=terms).samples
    assert np.allclose(plain, noisy, atol=1e-3)  # same per-step sampler noise, tiny extra estimate noise
