"""Per-sample random streams: sample i draws its noise from a numpy generator (PCG64) seeded with its own
seed, so results do not depend on batch size, backend or install (torch or not), and FP and quantized runs
compare sample by sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

# seeds, plus a run's sample indices and the calibration and correction offsets (up to 2**40), stay well inside
# what a generator takes
MAX_SEED = 2**62


class NoiseStream(Protocol):
    """What the sampler draws a sample's noise from: numpy's Generator, or anything with its `standard_normal`."""

    def standard_normal(self, size: Sequence[int], dtype=np.float32) -> np.ndarray: ...


def seed_generators(seeds: Sequence[int]) -> list[np.random.Generator]:
    return [np.random.Generator(np.random.PCG64(int(seed))) for seed in seeds]


def per_sample_noise(generators: Sequence[NoiseStream], shape: Sequence[int]) -> np.ndarray:
    """Standard normal float32 noise [len(generators), *shape], one draw per generator."""
    return np.stack(
        [np.asarray(g.standard_normal(tuple(shape), dtype=np.float32), dtype=np.float32) for g in generators]
    )
