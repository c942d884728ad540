"""Timestep groups (TFMQ-DM / APQ-DM's observation that activation ranges move with t): the sampler's
timesteps are split into contiguous groups, each with its own activation scales, exported as one graph
per group. Boundaries go where the per-layer ranges change most (optimal segmentation of the log-range
profile), or every N steps.
"""

from __future__ import annotations

import torch
from torch import nn

from stepquant.calibrators.data import CalibrationSet
from stepquant.calibrators.ranges import observing_fp
from stepquant.quant.quantize import activation_quantizers


class _MaxObserver:
    def __init__(self) -> None:
        self.amax = 0.0

    def update(self, x: torch.Tensor) -> None:
        self.amax = max(self.amax, float(x.abs().max()))


def range_profile(model: nn.Module, data: CalibrationSet) -> tuple[list[float], torch.Tensor]:
    """(timesteps from noisiest to cleanest, [T, Q] max |input| of every activation quantizer at each
    timestep, observed on FP activations as range calibration does)."""
    timesteps = data.unique_timesteps()
    with observing_fp(model) as quantizers, torch.no_grad():
        profile = torch.zeros(len(timesteps), len(quantizers), dtype=torch.float64)
        for i, t in enumerate(timesteps):
            observers = [_MaxObserver() for _ in quantizers]
            for (_, quantizer), observer in zip(quantizers, observers):
                quantizer.observer = observer
            for inputs in data.at_timestep(t, len(data)).batches(64):
                model(*inputs)
            profile[i] = torch.tensor([o.amax for o in observers])
    return timesteps, profile


def split_by_range_change(profile: torch.Tensor, groups: int) -> list[range]:
    """Contiguous groups of rows of `profile` minimising the within-group squared deviation of the log
    ranges (exact dynamic programme over boundaries)."""
    count = len(profile)
    if not 1 <= groups <= count:
        raise ValueError(f"cannot make {groups} timestep groups from {count} calibrated timesteps")
    logs = torch.log(profile.clamp(min=1e-12))
    cost = torch.zeros(count, count + 1, dtype=torch.float64)
    for i in range(count):
        for j in range(i + 1, count + 1):
            cost[i, j] = ((logs[i:j] - logs[i:j].mean(0)) ** 2).sum()
    best = torch.full((groups + 1, count + 1), float("inf"), dtype=torch.float64)
    back = torch.zeros((groups + 1, count + 1), dtype=torch.long)
    best[0, 0] = 0.0
    for g in range(1, groups + 1):
        for j in range(g, count + 1):
            options = best[g - 1, :j] + cost[:j, j]
            back[g, j] = int(torch.argmin(options))
            best[g, j] = options[back[g, j]]
    bounds, j = [count], count
    for g in range(groups, 0, -1):
        j = int(back[g, j])
        bounds.append(j)
    bounds.reverse()
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def split_every(count: int, steps_per_group: int) -> list[range]:
    if steps_per_group < 1:
        raise ValueError(f"steps per group must be at least 1, got {steps_per_group}")
    return [range(a, min(a + steps_per_group, count)) for a in range(0, count, steps_per_group)]


def group_scales(model: nn.Module, profile: torch.Tensor, groups: list[range]) -> list[list[torch.Tensor]]:
    """Activation scales per group: the calibrated (merged) scale times the group's share of the full
    range, max|x| over the group / max|x| over all timesteps. For max calibration that is exactly a max
    calibration on the group; for learned or searched scales it keeps their clipping ratio."""
    quantizers = activation_quantizers(model)
    overall = profile.max(0).values.clamp(min=1e-12)
    return [
        [q.scale * float(profile[list(g)].max(0).values[i] / overall[i]) for i, q in enumerate(quantizers)]
        for g in groups
    ]


def set_scales(model: nn.Module, scales: list[torch.Tensor]) -> None:
    """Install one group's activation scales (in the order `group_scales` lists quantizers)."""
    for quantizer, scale in zip(activation_quantizers(model), scales, strict=True):
        quantizer.scale = scale.detach().clone()
