"""Per-forward latency of a backend: warm-up, then repeated timed calls, reported as the median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stepquant.bundle.manifest import ConditionInput
from stepquant.runtime.backend import Backend


@dataclass
class Latency:
    batch: int
    median_ms: float
    p90_ms: float
    runs: int

    @property
    def images_per_second(self) -> float:
        return 1000.0 * self.batch / self.median_ms


def measure_latency(
    backend: Backend,
    sample_shape: tuple[int, int, int],
    batch: int,
    conditions: Sequence[ConditionInput] = (),
    sequence: int | None = None,
    warmup: int = 3,
    min_runs: int = 10,
    min_seconds: float = 3.0,
    max_runs: int = 200,
) -> Latency:
    """Time `backend` on a fixed random input (with random `conditions`, text ones `sequence` tokens long)
    until both `min_runs` and `min_seconds` are reached."""
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((batch, *sample_shape), dtype=np.float32)
    timestep = np.full((batch,), 500.0, dtype=np.float32)
    extra = {c.name: rng.standard_normal(c.concrete_shape(batch, sequence or 0), dtype=np.float32) for c in conditions}
    for _ in range(warmup):
        backend(sample, timestep, **extra)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - started < min_seconds):
        begin = time.perf_counter()
        backend(sample, timestep, **extra)
        times.append(1000.0 * (time.perf_counter() - begin))
    times.sort()
    return Latency(batch, statistics.median(times), times[int(0.9 * (len(times) - 1))], len(times))


class TimedBackend:
    """Wraps a backend and adds up the time spent in it, so a caller can tell network time from host time."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.seconds, self.calls = backend, 0.0, 0

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditions: np.ndarray) -> np.ndarray:
        begin = time.perf_counter()
        eps = self.backend(sample, timestep, **conditions)
        self.seconds += time.perf_counter() - begin
        self.calls += 1
        return eps
