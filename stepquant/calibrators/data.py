"""Timestep-aware calibration data (the Q-Diffusion recipe): run the FP model's own sampler from
seeded noise and keep (x_t, t) at uniformly spaced sampler steps."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stepquant.runtime.backend import Backend
from stepquant.runtime.sampler import SamplerConfig, sample


@dataclass
class CalibrationSet:
    """Network inputs from sampling trajectories: samples [N,C,H,W] and timesteps [N] (float32)."""

    samples: torch.Tensor
    timesteps: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.samples[start : start + batch_size], self.timesteps[start : start + batch_size]

    def at_timestep(self, timestep: float, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` inputs recorded at `timestep`."""
        index = torch.nonzero(self.timesteps == timestep).flatten()[:count]
        return self.samples[index], self.timesteps[index]

    def unique_timesteps(self) -> list[float]:
        return sorted({float(t) for t in self.timesteps}, reverse=True)


def calibration_step_indices(steps: int, calib_steps: int) -> list[int]:
    """`calib_steps` sampler-step indices spread uniformly over [0, steps - 1]."""
    count = max(1, min(calib_steps, steps))
    return sorted({int(i) for i in np.linspace(0, steps - 1, count).round()})


def collect_calibration_set(
    backend: Backend,
    scheduler_config: dict,
    seeds: Sequence[int],
    sample_shape: tuple[int, int, int],
    sampler: SamplerConfig,
    calib_steps: int,
    progress: bool = True,
) -> CalibrationSet:
    """Sample with the FP `backend` and record the inputs it sees at the chosen steps."""
    keep = set(calibration_step_indices(sampler.steps, calib_steps))
    xs: list[torch.Tensor] = []
    ts: list[torch.Tensor] = []

    def record(index: int, timestep: int, x: torch.Tensor) -> None:
        if index in keep:
            xs.append(x.clone())
            ts.append(torch.full((len(x),), float(timestep)))

    sample(backend, scheduler_config, seeds, sample_shape, sampler, on_step=record, progress=progress,
           desc="calibration trajectories")
    return CalibrationSet(samples=torch.cat(xs), timesteps=torch.cat(ts))
