"""Timestep-aware calibration data (the Q-Diffusion recipe): run the FP model's own sampler from
seeded noise and keep the network's inputs at uniformly spaced sampler steps. With classifier-free
guidance the network sees each x_t twice, with the unconditional and the conditional inputs: both
copies are kept, as Q-Diffusion does for Stable Diffusion, and paired, so the trajectory calibrators can
rebuild the guided estimate the sampler steps with (`SamplerStates`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stepquant.calibrators.shards import CallShards
from stepquant.models.schedulers import capture_table
from stepquant.runtime.backend import Backend
from stepquant.runtime.guidance import Conditioning, combine_guided
from stepquant.runtime.sampler import SamplerConfig, sample

CALIBRATION_SEED_OFFSET = 1_000_000  # calibration trajectories never share seeds with evaluation


@dataclass
class CalibrationSet:
    """Network inputs from sampling trajectories: samples [N,C,H,W], timesteps [N] (float32) and, for
    conditional models, each condition input [N, ...] in the model's input order. Recorded with a shard
    directory, samples and conditions stay on disk (`store`, one file per call; `samples` is None) and are read
    a call, or a batch of rows, at a time."""

    samples: torch.Tensor | None
    timesteps: torch.Tensor
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)
    # guided sampling: rows (unconditional, conditional) of each x_t the sampler stepped from, and the scale
    pairs: torch.Tensor | None = None
    guidance_scale: float = 1.0
    # rows of each recorded network call, in order: batches never span two, so a process that recorded some of
    # the calls runs each of them as one process recording all would (same shapes, same float rounding)
    segments: list[int] | None = None
    store: CallShards | None = None

    def __len__(self) -> int:
        return len(self.timesteps)

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """(samples, timesteps, *conditions): the positional arguments of an EpsilonModel."""
        return (self.samples, self.timesteps, *self.conditions.values())

    def subset(self, index: torch.Tensor | slice) -> CalibrationSet:
        """The rows `index`, in memory (read from the calls that hold them when the set is on disk)."""
        if self.store is None:
            return CalibrationSet(
                self.samples[index], self.timesteps[index], {k: v[index] for k, v in self.conditions.items()}
            )
        return CalibrationSet(*self.store.split(self.store.rows(torch.arange(len(self))[index])))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Model inputs (samples, timesteps, *conditions), `batch_size` rows at a time, never across two calls."""
        offset = 0
        for call, rows in enumerate(self.segments or [len(self)]):
            part, first = (CalibrationSet(*self.store.load(call)), 0) if self.store is not None else (self, offset)
            for start in range(first, first + rows, batch_size):
                yield part.subset(slice(start, min(start + batch_size, first + rows))).inputs()
            offset += rows

    def at_timestep(self, timestep: float, count: int) -> CalibrationSet:
        """The first `count` inputs recorded at `timestep`."""
        return self.subset(torch.nonzero(self.timesteps == timestep).flatten()[:count])

    def unique_timesteps(self) -> list[float]:
        return sorted({float(t) for t in self.timesteps}, reverse=True)

    def sampler_states(self) -> SamplerStates:
        """The states the sampler stepped from, each once, with the conditioning its estimate was made with."""
        if self.pairs is None:
            return SamplerStates(self, torch.arange(len(self)))
        return SamplerStates(self, self.pairs[:, 1], self.pairs[:, 0], self.guidance_scale)


@dataclass
class SamplerStates:
    """The sampler states x_t of `data` (its rows `rows`, the conditional half under guidance, whose
    unconditional twins are `unconditional_rows`) with the estimate the sampler took there: what multi-step
    and mixed-order calibration unroll, so they follow the guided update the sampler really takes. Read a batch
    of states at a time, so a set on disk stays there."""

    data: CalibrationSet
    rows: torch.Tensor
    unconditional_rows: torch.Tensor | None = None
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        self.timesteps = self.data.timesteps[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def at_timestep(self, timestep: float) -> torch.Tensor:
        """Indices of the states recorded at `timestep`."""
        return torch.nonzero(self.timesteps == timestep).flatten()

    def batch(self, index: torch.Tensor) -> StateBatch:
        """The states `index` with their conditioning, read once (from disk when the set is there)."""
        cond = self.data.subset(self.rows[index])
        uncond = {} if self.unconditional_rows is None else self.data.subset(self.unconditional_rows[index]).conditions
        return StateBatch(cond.samples, cond.conditions, uncond, self.guidance_scale)


@dataclass
class StateBatch:
    """Some sampler states: x_t, the condition inputs of their estimate and, under guidance, the unconditional
    ones and the scale."""

    samples: torch.Tensor
    conditions: dict[str, torch.Tensor]
    unconditional: dict[str, torch.Tensor] = field(default_factory=dict)
    guidance_scale: float = 1.0

    def select(self, rows: torch.Tensor) -> StateBatch:
        return StateBatch(
            self.samples[rows],
            {k: v[rows] for k, v in self.conditions.items()},
            {k: v[rows] for k, v in self.unconditional.items()},
            self.guidance_scale,
        )

    def estimate(self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's estimate at x (these states moved along) with their conditioning, guided (one batch of
        both halves, as the runtime runs it) when the states were."""
        if not self.unconditional:
            return model(x, t, *self.conditions.values())
        both = model(
            torch.cat([x, x]),
            torch.cat([t, t]),
            *(torch.cat([self.unconditional[k], v]) for k, v in self.conditions.items()),
        )
        return combine_guided(*both.chunk(2), self.guidance_scale)


def calibration_step_indices(steps: int, calib_steps: int) -> list[int]:
    """`calib_steps` sampler-step indices spread uniformly over [0, steps - 1]."""
    count = max(1, min(calib_steps, steps))
    return sorted({int(i) for i in np.linspace(0, steps - 1, count).round()})


class _Recorder:
    """A backend that passes calls through and keeps the inputs it sees at the chosen timesteps (`guided`:
    every call holds the unconditional half, then the conditional half, of one batch of states)."""

    def __init__(self, backend: Backend, timesteps: set[float], guided: bool, store: CallShards | None) -> None:
        self.backend, self.timesteps, self.guided, self.calls, self.store = backend, timesteps, guided, [], store
        self.segments: list[int] = []  # rows of each recorded call
        self.pairs: list[torch.Tensor] = []  # guided: (unconditional row, conditional row) of each recorded state

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditions: np.ndarray) -> np.ndarray:
        if float(timestep[0]) in self.timesteps:
            if self.guided:
                first, half = sum(self.segments), torch.arange(len(sample) // 2)
                self.pairs.append(torch.stack([first + half, first + len(half) + half], 1))
            self.segments.append(len(sample))
            call = (torch.tensor(sample), torch.tensor(timestep), {k: torch.tensor(v) for k, v in conditions.items()})
            if self.store is None:
                self.calls.append(call)
            else:  # on disk; only the timesteps stay here
                self.store.append(*call)
                self.calls.append((None, call[1], {}))
        return self.backend(sample, timestep, **conditions)


def collect_calibration_set(
    backend: Backend,
    scheduler_config: dict,
    seeds: Sequence[int],
    sample_shape: tuple[int, int, int],
    sampler: SamplerConfig,
    calib_steps: int,
    progress: bool = True,
    conditioning: Conditioning | None = None,
    batch_size: int = 64,
    shard_dir: Path | None = None,
) -> CalibrationSet:
    """Sample with the FP `backend`, `batch_size` seeds at a time, and record the inputs it sees at the chosen steps
    (in memory, or with `shard_dir` on disk there, one file per call)."""
    table = capture_table(sampler, scheduler_config)
    guided = conditioning is not None and sampler.guidance_scale != 1.0
    store = None if shard_dir is None else CallShards(shard_dir)
    recorder = _Recorder(
        backend,
        {float(table.timesteps[i]) for i in calibration_step_indices(sampler.steps, calib_steps)},
        guided,
        store,
    )
    sample(
        recorder,
        table,
        seeds,
        sample_shape,
        sampler,
        batch_size,
        progress=progress,
        desc="calibration trajectories",
        conditioning=conditioning,
    )
    names = recorder.calls[0][2].keys()
    pairs = torch.cat(recorder.pairs) if guided else None
    timesteps = torch.cat([c[1] for c in recorder.calls])
    if store is not None:
        return CalibrationSet(
            None, timesteps, pairs=pairs, guidance_scale=sampler.guidance_scale, segments=recorder.segments, store=store
        )
    return CalibrationSet(
        samples=torch.cat([c[0] for c in recorder.calls]),
        timesteps=timesteps,
        conditions={name: torch.cat([c[2][name] for c in recorder.calls]) for name in names},
        pairs=pairs,
        guidance_scale=sampler.guidance_scale,
        segments=recorder.segments,
    )
