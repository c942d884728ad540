"""Estimators of per-timestep correction terms (PTQD, D2-DPM, TAC-Diffusion) from FP and quantized
noise estimates on the same inputs. Statistics are streamed as per-timestep, per-channel sums, so memory
does not grow with the number of calibration samples. Formulas: shared/research/anchors-academic.md.

Conditional models are corrected where the sampler uses the estimate: on the guided estimate
eps_u + g (eps_c - eps_u) of each network (`per_branch=False`, the default), or, to compare, with terms fitted
to the unconditional and conditional outputs apart and pooled (`per_branch=True`; README, "Guidance")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stepquant.calibrators import distributed
from stepquant.models.schedulers import capture_table
from stepquant.runtime.backend import Backend
from stepquant.runtime.corrections import Corrections
from stepquant.runtime.guidance import Conditioning, combine_guided, guided_estimate
from stepquant.runtime.sampler import SamplerConfig, sample
from stepquant.runtime.seeding import per_sample_noise, seed_generators

MAX_CORRELATION = 0.9999  # D2-DPM clips the correlation of (estimate, error) to keep the conditional variance positive


class ErrorStatistics:
    """Per timestep and channel, sums of eps (FP), q (quantized estimate), d = q - eps and their products."""

    _SUMS = ("n", "e", "q", "d", "ee", "qq", "dd", "ed", "qd", "qe")

    def __init__(self, timesteps: Sequence[int], channels: int) -> None:
        self.timesteps = [int(t) for t in timesteps]
        self.sums = {name: torch.zeros(len(self.timesteps), channels, dtype=torch.float64) for name in self._SUMS}

    def update(self, timestep: int, eps: np.ndarray, estimate: np.ndarray) -> None:
        i = self.timesteps.index(int(timestep))
        eps, estimate = torch.from_numpy(np.asarray(eps)), torch.from_numpy(np.asarray(estimate))
        e = eps.double().transpose(0, 1).flatten(1)  # [C, N*H*W]
        q = estimate.double().transpose(0, 1).flatten(1)
        d = q - e
        values = {
            "n": torch.ones_like(e),
            "e": e,
            "q": q,
            "d": d,
            "ee": e * e,
            "qq": q * q,
            "dd": d * d,
            "ed": e * d,
            "qd": q * d,
            "qe": q * e,
        }
        for name, value in values.items():
            self.sums[name][i] += value.sum(dim=1)

    def summed_over_processes(self) -> ErrorStatistics:
        """Every process's sums added (under torchrun; unchanged in one process)."""
        self.sums = {name: distributed.reduce_sum(value) for name, value in self.sums.items()}
        return self

    def moments(self, per_channel: bool) -> dict[str, torch.Tensor]:
        """Means and (co)variances per timestep (and channel when `per_channel`)."""
        sums = self.sums if per_channel else {k: v.sum(dim=1, keepdim=True) for k, v in self.sums.items()}
        n = sums["n"].clamp(min=1)
        mean = {k: sums[k] / n for k in ("e", "q", "d")}

        def cov(a: str, b: str, ab: str) -> torch.Tensor:
            return sums[ab] / n - mean[a] * mean[b]

        return {
            "mean_e": mean["e"],
            "mean_q": mean["q"],
            "mean_d": mean["d"],
            "var_e": cov("e", "e", "ee"),
            "var_q": cov("q", "q", "qq"),
            "var_d": cov("d", "d", "dd"),
            "cov_ed": cov("e", "d", "ed"),
            "cov_qd": cov("q", "d", "qd"),
            "n": sums["n"],
        }


def ptqd(stats: ErrorStatistics) -> Corrections:
    """PTQD: d = k eps + d'' with k the regression slope of the error on the FP estimate (kept only when
    positive), d'' of per-channel mean b and variance s^2; eps' = (q - b) / (1 + k), residual variance s^2/(1+k)^2."""
    whole, channel = stats.moments(per_channel=False), stats.moments(per_channel=True)
    k = (whole["cov_ed"] / whole["var_e"].clamp(min=1e-12)).clamp(min=0.0)  # [T, 1]
    bias = channel["mean_d"] - k * channel["mean_e"]  # per-channel mean of d - k eps
    # variance of d - k eps around its per-channel mean (the bias term removes the between-channel part)
    per_channel = channel["var_d"] - 2 * k * channel["cov_ed"] + k * k * channel["var_e"]
    residual = (per_channel * channel["n"]).sum(dim=1, keepdim=True) / channel["n"].sum(dim=1, keepdim=True).clamp(
        min=1
    )
    gain = 1.0 / (1.0 + k)
    return Corrections(
        "ptqd",
        np.array(stats.timesteps),
        gain.expand_as(bias).numpy(),
        (-bias * gain).numpy(),
        np.zeros(len(stats.timesteps)),
        (residual.clamp(min=0) * gain * gain).flatten().numpy(),
        np.zeros(tuple(bias.shape)),
    )


def d2(stats: ErrorStatistics, stochastic: bool) -> Corrections:
    """D2-DPM: a joint Gaussian of (q, d) per timestep; the error's conditional mean given the observed q,
    mu_d + s (q - mu_q) with s = cov(q, d) / var(q), is removed: eps' = (1 - s) q + s mu_q - mu_d. Its
    conditional variance is either sampled back (stochastic) or taken out of the sampler's noise (deterministic)."""
    m = stats.moments(per_channel=False)
    std_q, std_d = m["var_q"].clamp(min=1e-12).sqrt(), m["var_d"].clamp(min=1e-12).sqrt()
    rho = (m["cov_qd"] / (std_q * std_d)).clamp(-MAX_CORRELATION, MAX_CORRELATION)
    slope = rho * std_d / std_q
    conditional_var = (m["var_d"] * (1 - rho * rho)).clamp(min=0).flatten()
    channels = stats.sums["n"].shape[1]
    steps = len(stats.timesteps)
    gain = (1 - slope).expand(steps, channels).float().contiguous()
    bias = (slope * m["mean_q"] - m["mean_d"]).expand(steps, channels).float().contiguous()
    noise_std = conditional_var.sqrt().float() if stochastic else torch.zeros(steps)
    residual_var = torch.zeros(steps) if stochastic else conditional_var.float()
    method = "d2-stochastic" if stochastic else "d2-deterministic"
    return Corrections(
        method,
        np.array(stats.timesteps),
        gain.numpy(),
        bias.numpy(),
        noise_std.numpy(),
        residual_var.numpy(),
        np.zeros((steps, channels)),
    )


def tac_gain(stats: ErrorStatistics, shrinkage: float = 0.1) -> torch.Tensor:
    """TAC's noise-estimation reconstruction K per (timestep, channel), closed form of
    min ||K q - eps||^2 + shrinkage * N (K - 1)^2 (its relative-distortion weight set to 0: q / eps is
    unbounded where eps is near 0)."""
    n = stats.sums["n"]
    return ((stats.sums["qe"] + shrinkage * n) / (stats.sums["qq"] + shrinkage * n)).float()


class _PairedBackend:
    """Runs the FP backend (which drives the trajectory) and the quantized one on the same inputs. Under
    guidance (`guidance_scale` not None) each call holds both halves: the statistics are of the guided
    estimates, or of each half (`per_branch`)."""

    def __init__(
        self, fp: Backend, quantized: Backend, stats: ErrorStatistics, guidance_scale: float | None, per_branch: bool
    ) -> None:
        self.fp, self.quantized, self.stats = fp, quantized, stats
        self.guidance_scale, self.per_branch = guidance_scale, per_branch

    def __call__(self, sample_: np.ndarray, timestep: np.ndarray, **conditions: np.ndarray) -> np.ndarray:
        eps = self.fp(sample_, timestep, **conditions)
        estimate = self.quantized(sample_, timestep, **conditions)
        if self.guidance_scale is None or self.per_branch:
            self.stats.update(int(timestep[0]), eps, estimate)
        else:
            self.stats.update(
                int(timestep[0]),
                combine_guided(*np.split(eps, 2), self.guidance_scale),
                combine_guided(*np.split(estimate, 2), self.guidance_scale),
            )
        return eps


def collect_statistics(
    fp: Backend,
    quantized: Backend,
    noise_schedule: dict,
    seeds: Sequence[int],
    sample_shape: tuple[int, int, int],
    config: SamplerConfig,
    progress: bool = True,
    conditioning: Conditioning | None = None,
    per_branch: bool = False,
) -> ErrorStatistics:
    """Error statistics along the FP model's own (guided) trajectories (PTQD's and D2's collection)."""
    table = capture_table(config, noise_schedule)
    stats = ErrorStatistics([int(t) for t in table.timesteps], sample_shape[0])
    guided = conditioning is not None and config.guidance_scale != 1.0
    sample(
        _PairedBackend(fp, quantized, stats, config.guidance_scale if guided else None, per_branch),
        table,
        seeds,
        sample_shape,
        config,
        progress=progress,
        desc="correction statistics",
        conditioning=conditioning,
    )
    return stats.summed_over_processes()


class _LastOutput:
    """A backend that keeps its last output (both halves of a guided call)."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.last = backend, None

    def __call__(self, sample_: np.ndarray, timestep: np.ndarray, **conditions: np.ndarray) -> np.ndarray:
        self.last = self.backend(sample_, timestep, **conditions)
        return self.last


def fit_tac(
    fp: Backend,
    quantized: Backend,
    noise_schedule: dict,
    seeds: Sequence[int],
    sample_shape: tuple[int, int, int],
    config: SamplerConfig,
    shrinkage: float = 0.1,
    conditioning: Conditioning | None = None,
    per_branch: bool = False,
) -> Corrections:
    """TAC-Diffusion, fitted step by step along the *corrected* quantized trajectory: at each step the
    input bias (mean of x_q - x_fp per channel) is removed from the quantized state, then the per-channel
    gain K is fitted (on the guided estimates, or on both halves with `per_branch`) and applied before both
    trajectories take their step with the same noise."""
    table = capture_table(config, noise_schedule)
    timesteps = [int(t) for t in table.timesteps]
    channels = sample_shape[0]
    fp_gen, q_gen = seed_generators(seeds), seed_generators(seeds)
    x_fp = np.float32(table.init_noise_sigma) * per_sample_noise(fp_gen, sample_shape)
    x_q = np.float32(table.init_noise_sigma) * per_sample_noise(q_gen, sample_shape)
    gains, input_biases = [], []
    fp_samples: list[np.ndarray] = []
    fp_outputs: list[np.ndarray] = []
    q_samples: list[np.ndarray] = []
    q_outputs: list[np.ndarray] = []

    positions = range(len(seeds))
    for i, t in enumerate(timesteps):
        # the mean over every process's trajectories (per channel: sum and count, summed)
        drift = distributed.reduce_sum(torch.from_numpy((x_q - x_fp).astype(np.float64).sum(axis=(0, 2, 3))))
        count = distributed.reduce_sum(torch.tensor(float(x_q.size // channels), dtype=torch.float64))
        input_bias = (drift / count).numpy().astype(x_q.dtype)
        x_q = x_q - input_bias.reshape(1, -1, 1, 1)  # the drift is removed from the state, as at run time
        ts = np.full((len(seeds),), float(t), dtype=np.float32)
        scale = np.float32(table.input_scale[i])  # what the network sees (Euler scales its input)
        fp_out, q_out = _LastOutput(fp), _LastOutput(quantized)
        eps = guided_estimate(fp_out, scale * x_fp, ts, conditioning, positions, config.guidance_scale)
        estimate = guided_estimate(q_out, scale * x_q, ts, conditioning, positions, config.guidance_scale)
        stats = ErrorStatistics([t], channels)
        stats.update(t, *((fp_out.last, q_out.last) if per_branch else (eps, estimate)))
        gain = tac_gain(stats.summed_over_processes(), shrinkage)[0].numpy()
        noise = table.noise_std[i] > 0  # the same noise for both trajectories
        fp_samples, fp_outputs = table.remember(fp_samples, x_fp), table.remember(fp_outputs, eps)
        q_samples, q_outputs = (
            table.remember(q_samples, x_q),
            table.remember(q_outputs, gain.reshape(1, -1, 1, 1) * estimate),
        )
        x_fp = table.step(i, fp_samples, fp_outputs, per_sample_noise(fp_gen, sample_shape) if noise else None)
        x_q = table.step(i, q_samples, q_outputs, per_sample_noise(q_gen, sample_shape) if noise else None)
        gains.append(gain)
        input_biases.append(input_bias)
    steps = len(timesteps)
    return Corrections(
        "tac",
        np.array(timesteps),
        np.stack(gains),
        np.zeros((steps, channels)),
        np.zeros(steps),
        np.zeros(steps),
        np.stack(input_biases),
    )


@dataclass(frozen=True)
class EstimationRun:
    """What every estimator is given: both backends, the sampler and its noise schedule, the trajectories'
    seeds, shape and conditioning, and whether guided terms are fitted per branch."""

    fp: Backend
    quantized: Backend
    noise_schedule: dict
    seeds: Sequence[int]
    sample_shape: tuple[int, int, int]
    config: SamplerConfig
    progress: bool = True
    conditioning: Conditioning | None = None
    per_branch: bool = False

    def statistics(self) -> ErrorStatistics:
        return collect_statistics(
            self.fp,
            self.quantized,
            self.noise_schedule,
            self.seeds,
            self.sample_shape,
            self.config,
            self.progress,
            self.conditioning,
            self.per_branch,
        )

    def identity(self) -> Corrections:
        return Corrections.identity(
            [int(t) for t in capture_table(self.config, self.noise_schedule).timesteps], self.sample_shape[0]
        )

    def tac(self) -> Corrections:
        return fit_tac(
            self.fp,
            self.quantized,
            self.noise_schedule,
            self.seeds,
            self.sample_shape,
            self.config,
            conditioning=self.conditioning,
            per_branch=self.per_branch,
        )


# --correction: name -> estimator (the runtime's correction METHODS, kept in step by a test)
ESTIMATORS: dict[str, Callable[[EstimationRun], Corrections]] = {
    "none": EstimationRun.identity,
    "ptqd": lambda run: ptqd(run.statistics()),
    "d2-deterministic": lambda run: d2(run.statistics(), stochastic=False),
    "d2-stochastic": lambda run: d2(run.statistics(), stochastic=True),
    "tac": EstimationRun.tac,
}


def estimate_corrections(
    method: str,
    fp: Backend,
    quantized: Backend,
    noise_schedule: dict,
    seeds: Sequence[int],
    sample_shape: tuple[int, int, int],
    config: SamplerConfig,
    progress: bool = True,
    conditioning: Conditioning | None = None,
    per_branch: bool = False,
) -> Corrections:
    """The correction terms of `method` for the sampler `config` (its timesteps key the terms); conditional
    models sample with `conditioning`, guided by `config.guidance_scale`."""
    if method not in ESTIMATORS:
        raise ValueError(f"unknown correction method {method!r}; choose from {', '.join(ESTIMATORS)}")
    per_branch = per_branch and conditioning is not None and config.guidance_scale != 1.0
    return ESTIMATORS[method](
        EstimationRun(fp, quantized, noise_schedule, seeds, sample_shape, config, progress, conditioning, per_branch)
    )
