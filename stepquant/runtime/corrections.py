"""Per-timestep correction terms, applied by the sampler's host loop whatever backend runs the network.

PTQD, D2-DPM and TAC-Diffusion all map the quantized noise estimate through a per-timestep affine
function; PTQD and D2 also shrink the sampler's noise variance and TAC removes an input bias. One
representation covers them (the estimators live in stepquant.calibrators.corrections):

    x_t <- x_t - input_bias[t]                      (per channel, on the sampler's state; TAC's input bias correction)
    eps' = gain[t] * backend(x_t, t) + bias[t]      (per channel)
    eps' += noise_std[t] * z                        (D2's stochastic variant)
    sigma_t'^2 = max(sigma_t^2 - c_t^2 * residual_var[t], 0)   (variance schedule calibration, stochastic samplers)

c_t is the net weight of the network output in the sampler's update (SchedulerTable.output_coefficient), so
the sampler's own noise makes room for the noise the quantized estimate already carries; the update's
coefficients are otherwise the scheduler's.

Terms are keyed by the scheduler's timestep values, so a bundle exported for 25 steps refuses a run at
50 steps unless its terms cover those timesteps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from stepquant.runtime.seeding import NoiseStream, per_sample_noise

METHODS = ("none", "ptqd", "d2-deterministic", "d2-stochastic", "tac")
_TENSORS = ("timesteps", "gain", "bias", "noise_std", "residual_var", "input_bias")


class CorrectionError(ValueError):
    """Correction terms are missing, malformed, or do not cover the sampler's timesteps."""


@dataclass(frozen=True)
class _StepTerms:
    gain: np.ndarray
    bias: np.ndarray
    input_bias: np.ndarray | None
    noise_std: float
    residual_var: float


@dataclass
class Corrections:
    method: str
    timesteps: np.ndarray  # [T] int64, the scheduler's timestep values
    gain: np.ndarray  # [T, C] float32
    bias: np.ndarray  # [T, C]
    noise_std: np.ndarray  # [T]
    residual_var: np.ndarray  # [T]
    input_bias: np.ndarray  # [T, C]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CorrectionError(f"unknown correction method {self.method!r}; choose from {', '.join(METHODS)}")
        self.timesteps = np.asarray(self.timesteps, dtype=np.int64)
        for name in _TENSORS[1:]:
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float32))
        steps = len(self.timesteps)
        channels = self.gain.shape[1] if self.gain.ndim == 2 else -1
        for name, shape in (
            ("gain", (steps, channels)),
            ("bias", (steps, channels)),
            ("input_bias", (steps, channels)),
            ("noise_std", (steps,)),
            ("residual_var", (steps,)),
        ):
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape:
                raise CorrectionError(f"correction term {name} has shape {tuple(tensor.shape)}, expected {shape}")
            if not np.isfinite(tensor).all():
                raise CorrectionError(f"correction term {name} holds NaN or inf")
        if (self.noise_std < 0).any() or (self.residual_var < 0).any():
            raise CorrectionError("noise_std and residual_var must not be negative")

    @classmethod
    def identity(cls, timesteps: Sequence[int], channels: int, method: str = "none") -> Corrections:
        steps = len(timesteps)
        return cls(
            method,
            np.asarray(list(timesteps), dtype=np.int64),
            np.ones((steps, channels)),
            np.zeros((steps, channels)),
            np.zeros(steps),
            np.zeros(steps),
            np.zeros((steps, channels)),
        )

    def index(self, timestep: int) -> int:
        positions = self.__dict__.setdefault("_positions", {int(t): i for i, t in enumerate(self.timesteps.tolist())})
        if int(timestep) not in positions:
            raise CorrectionError(
                f"no correction terms for timestep {int(timestep)}: the bundle's terms cover "
                f"{len(self.timesteps)} timesteps ({self.timesteps.tolist()[:4]}...); sample with "
                "the step count it was exported for"
            )
        return positions[int(timestep)]

    def check_covers(self, timesteps: Sequence[int]) -> None:
        for timestep in timesteps:
            self.index(int(timestep))

    def _step(self, timestep: int) -> _StepTerms:
        """The terms of one timestep, shaped for broadcasting and cached: the host loop's per-step cost
        stays a lookup and one multiply-add."""
        cache = self.__dict__.setdefault("_steps", {})
        if timestep not in cache:
            i = self.index(timestep)
            shape = (1, -1, 1, 1)
            input_bias = self.input_bias[i].reshape(shape)
            cache[timestep] = _StepTerms(
                self.gain[i].reshape(shape),
                self.bias[i].reshape(shape),
                input_bias if input_bias.any() else None,
                float(self.noise_std[i]),
                float(self.residual_var[i]),
            )
        return cache[timestep]

    def correct_input(self, x: np.ndarray, timestep: int) -> np.ndarray:
        input_bias = self._step(int(timestep)).input_bias
        return x if input_bias is None else x - input_bias

    def correct_mean(self, eps: np.ndarray, timestep: int) -> np.ndarray:
        """The affine part, gain * eps + bias: the same on each half of a guided batch as on their combination."""
        terms = self._step(int(timestep))
        return terms.gain * eps + terms.bias

    def correct_estimate(self, eps: np.ndarray, timestep: int, generators: Sequence[NoiseStream]) -> np.ndarray:
        terms = self._step(int(timestep))
        eps = self.correct_mean(eps, timestep)
        if terms.noise_std > 0:
            eps = eps + terms.noise_std * per_sample_noise(generators, eps.shape[1:])
        return eps

    def sampler_noise_std(self, timestep: int, scheduler_std: float, output_coefficient: float) -> float:
        """The sampler's noise at this step after variance schedule calibration (PTQD, D2 deterministic)."""
        residual = self._step(int(timestep)).residual_var
        if residual <= 0 or scheduler_std <= 0:
            return scheduler_std
        return float(np.sqrt(max(scheduler_std**2 - output_coefficient**2 * residual, 0.0)))

    def save(self, path: Path) -> None:
        save_file(
            {name: np.ascontiguousarray(getattr(self, name)) for name in _TENSORS},
            str(path),
            metadata={"method": self.method},
        )

    @classmethod
    def load(cls, path: Path) -> Corrections:
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "np") as handle:
                method = (handle.metadata() or {}).get("method", "")
        except (SafetensorError, OSError, ValueError) as err:
            raise CorrectionError(f"cannot read correction terms from {path}: {err}") from err
        missing = [name for name in _TENSORS if name not in tensors]
        if missing:
            raise CorrectionError(f"{path} lacks correction terms {', '.join(missing)}")
        return cls(method, **{name: tensors[name] for name in _TENSORS})
