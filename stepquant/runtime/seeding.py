"""Per-sample random streams: sample i draws its noise from a generator seeded with its own seed, so
results do not depend on batch size or backend, and FP and quantized runs compare sample by sample."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# seeds, plus a run's sample indices and the calibration and correction offsets (up to 2**40), stay inside a
# generator's 64-bit seed
MAX_SEED = 2**62


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def per_sample_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise [len(generators), *shape], one draw per generator (as diffusers' randn_tensor
    draws from a list of generators)."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])
