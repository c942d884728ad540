"""A sampler's update as numbers: the scheduler table a bundle carries, so the device loop is the same few
multiply-adds for every scheduler and needs neither torch nor diffusers.

diffusers' DDIM, DDPM and multistep solvers all update the sample linearly in the current sample, the current
(and earlier) network outputs and fresh noise, except for clipping of the predicted x0. At export the
scheduler is probed for those coefficients (stepquant.models.schedulers.capture_table) and checked against
itself; step i here is then

    x0      = clip(x0_from_sample[i] * x + x0_from_output[i] * out)           (only where `clip` is set)
    x_next  = from_x0[i] * x0 + sum_k (from_sample[i, k] * x_{i-k} + from_output[i, k] * out_{i-k})
              + noise_std[i] * z                                               (z: the sample's own noise)

with the network called on input_scale[i] * x at timesteps[i], starting from init_noise_sigma * z.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_ROWS = ("timesteps", "input_scale", "x0_from_sample", "x0_from_output", "from_x0", "noise_std")
_HISTORY = ("from_sample", "from_output")


class SchedulerTableError(ValueError):
    """A scheduler table that is malformed, or that does not fit the requested sampler."""


@dataclass(frozen=True)
class SchedulerTable:
    """One sampler (scheduler, step count, eta) as per-step coefficients; arrays are float64."""

    scheduler: str  # stepquant's name of it: ddim, ddpm, ...
    steps: int
    eta: float
    karras_sigmas: bool
    prediction_type: (
        str  # what the network outputs: epsilon (v_prediction and sample are converted by the coefficients)
    )
    init_noise_sigma: float
    clip: float | None  # range of the predicted-x0 clip, None without clipping
    timesteps: np.ndarray  # [N] what the network is given
    input_scale: np.ndarray  # [N]
    x0_from_sample: np.ndarray  # [N]
    x0_from_output: np.ndarray  # [N]
    from_x0: np.ndarray  # [N]
    from_sample: np.ndarray  # [N, K] history of samples x_i, x_{i-1}, ...
    from_output: np.ndarray  # [N, K] history of network outputs
    noise_std: np.ndarray  # [N]
    source: dict[str, Any] = field(default_factory=dict)  # the diffusers class and config it was captured from

    def __post_init__(self) -> None:
        n = len(self.timesteps)
        if n != self.steps or n < 1:
            raise SchedulerTableError(f"a {self.scheduler} table for {self.steps} steps holds {n} timesteps")
        for name in _ROWS:
            if getattr(self, name).shape != (n,):
                raise SchedulerTableError(
                    f"scheduler table row {name} has shape {getattr(self, name).shape}, expected ({n},)"
                )
        depth = self.from_sample.shape[1] if self.from_sample.ndim == 2 else 0
        for name in _HISTORY:
            if getattr(self, name).shape != (n, depth) or depth < 1:
                raise SchedulerTableError(
                    f"scheduler table history {name} has shape {getattr(self, name).shape}, expected ({n}, K)"
                )
        for name in (*_ROWS, *_HISTORY):
            if not np.isfinite(getattr(self, name)).all():
                raise SchedulerTableError(f"scheduler table row {name} holds NaN or inf")
        if (
            (self.noise_std < 0).any()
            or not math.isfinite(self.init_noise_sigma)
            or (self.clip is not None and self.clip <= 0)
        ):
            raise SchedulerTableError(
                "scheduler table: negative noise, a non-finite initial sigma or a non-positive clip range"
            )

    @property
    def depth(self) -> int:
        """How many past samples and outputs a step reads (1: the current ones only)."""
        return self.from_sample.shape[1]

    @property
    def stochastic(self) -> bool:
        return bool((self.noise_std > 0).any())

    def describe(self) -> str:
        return (
            f"{self.scheduler.upper()}, {self.steps} steps"
            + (f", eta {self.eta:g}" if self.scheduler == "ddim" else "")
            + (", Karras sigmas" if self.karras_sigmas else "")
        )

    def remember(self, history: list, value) -> list:
        """`history` (newest first) with `value` in front, as long as a step reads: the window `step` takes."""
        return [value, *history[: self.depth - 1]]

    def output_coefficient(self, i: int) -> float:
        """The net weight of the current network output in step i's update (through x0 and directly): PTQD's
        c_t, by which quantization noise in the output reaches the sample."""
        return float(self.from_output[i, 0] + self.from_x0[i] * self.x0_from_output[i])

    def step(self, i: int, samples: Sequence, outputs: Sequence, noise=None, noise_std: float | None = None):
        """x_{i+1} from the newest-first histories `samples` (x_i, x_{i-1}, ...) and `outputs`; `noise` is
        the fresh noise (needed where noise_std > 0), `noise_std` overrides the table's (variance calibration).

        Works on numpy arrays and, for the calibrators' unrolled steps, on torch tensors alike."""
        x, out = samples[0], outputs[0]
        nxt = 0.0
        if self.from_x0[i] != 0.0:
            x0 = float(self.x0_from_sample[i]) * x + float(self.x0_from_output[i]) * out
            if self.clip is not None:
                x0 = x0.clip(-self.clip, self.clip)  # numpy arrays and torch tensors alike
            nxt = float(self.from_x0[i]) * x0
        for k in range(min(self.depth, len(samples))):
            if self.from_sample[i, k] != 0.0:
                nxt = nxt + float(self.from_sample[i, k]) * samples[k]
            if self.from_output[i, k] != 0.0:
                nxt = nxt + float(self.from_output[i, k]) * outputs[k]
        std = float(self.noise_std[i]) if noise_std is None else noise_std
        if std > 0.0:
            if noise is None:
                raise SchedulerTableError(f"step {i} of the {self.describe()} sampler needs noise")
            nxt = nxt + std * noise
        return nxt

    def check_sampler(self, scheduler: str, steps: int, eta: float, karras_sigmas: bool = False) -> None:
        """Refuse, in one line, a request this table does not describe."""
        if (scheduler, steps, karras_sigmas) != (self.scheduler, self.steps, self.karras_sigmas) or (
            scheduler == "ddim" and eta != self.eta
        ):
            raise SchedulerTableError(
                f"the bundle's sampler is {self.describe()}; it cannot sample {scheduler.upper()} with {steps} steps"
                + (f", eta {eta:g}" if scheduler == "ddim" else "")
                + (", Karras sigmas" if karras_sigmas else "")
                + ": use the bundle's sampler, or re-export with that one"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler,
            "steps": self.steps,
            "eta": self.eta,
            "karras_sigmas": self.karras_sigmas,
            "prediction_type": self.prediction_type,
            "init_noise_sigma": self.init_noise_sigma,
            "clip": self.clip,
            **{name: getattr(self, name).tolist() for name in (*_ROWS, *_HISTORY)},
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SchedulerTable:
        try:
            scalars = {
                "scheduler": str(data["scheduler"]),
                "steps": int(data["steps"]),
                "eta": float(data["eta"]),
                "karras_sigmas": bool(data.get("karras_sigmas", False)),
                "prediction_type": str(data["prediction_type"]),
                "init_noise_sigma": float(data["init_noise_sigma"]),
                "clip": None if data["clip"] is None else float(data["clip"]),
                "source": dict(data.get("source", {})),
            }
            arrays = {name: np.asarray(data[name], dtype=np.float64) for name in (*_ROWS, *_HISTORY)}
        except (KeyError, TypeError, ValueError) as err:
            raise SchedulerTableError(f"malformed scheduler table: {type(err).__name__} {err}") from None
        return cls(**scalars, **arrays)
