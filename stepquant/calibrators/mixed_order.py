"""Mixed-order (sampling-aware) calibration: the quantized model's first-order direction is aligned with
the FP model's second-order one along the same trajectory.

DPM-Solver-2 (single-step, midpoint in log-SNR) is a DDIM step whose noise estimate is taken at the
midpoint node r reached by a first-order step: eps_FP(x_r, r). Training the quantized model so that
eps_Q(x_t, t) matches that estimate makes its DDIM steps follow the FP second-order solver, so the
quantization error and part of the discretisation error are fitted together. Under guidance both sides
are the guided estimates the sampler steps with (the midpoint node reached by the guided first-order step).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stepquant.calibrators.data import CalibrationSet, SamplerStates
from stepquant.calibrators.multistep import Objective
from stepquant.calibrators.reconstruction import BlockRecords


def _log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod))


def midpoint_timestep(scheduler, timestep: int, prev: int) -> float:
    """The (fractional) training timestep halfway between `timestep` and `prev` in log-SNR."""
    lam = _log_snr(scheduler.alphas_cumprod.double()).numpy()
    target = 0.5 * (lam[timestep] + lam[prev])
    return float(np.interp(target, lam[::-1], np.arange(len(lam))[::-1]))


def _alpha_at(scheduler, timestep: float) -> float:
    """alphas_cumprod linearly interpolated at a fractional timestep."""
    table = scheduler.alphas_cumprod.double().numpy()
    return float(np.interp(timestep, np.arange(len(table)), table))


@torch.no_grad()
def second_order_targets(
    fp_model: nn.Module, states: SamplerStates, scheduler, batch_size: int = 64
) -> Iterator[torch.Tensor]:
    """eps_FP at the DPM-Solver-2 midpoint node for every sampler state, `batch_size` states at a time in
    order (the FP first-order estimate itself at the last step, which has no next timestep to take a midpoint
    with)."""
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    for start in range(0, len(states), batch_size):
        index = torch.arange(start, min(start + batch_size, len(states)))
        batch, timesteps = states.batch(index), states.timesteps[index]
        samples = batch.samples
        eps = batch.estimate(fp_model, samples, timesteps)
        out = eps.clone()
        for t in timesteps.unique().tolist():
            rows = timesteps == t
            prev = int(t) - step
            if prev < 0:
                continue
            r = midpoint_timestep(scheduler, int(t), prev)
            alpha_t, alpha_r = float(scheduler.alphas_cumprod[int(t)]), _alpha_at(scheduler, r)
            x0 = (samples[rows] - (1 - alpha_t) ** 0.5 * eps[rows]) / alpha_t**0.5
            x_r = alpha_r**0.5 * x0 + (1 - alpha_r) ** 0.5 * eps[rows]
            out[rows] = batch.select(rows).estimate(fp_model, x_r, torch.full((int(rows.sum()),), r))
        yield out


def mixed_order_objective(
    fp_model: nn.Module,
    q_model: nn.Module,
    data: CalibrationSet,
    scheduler,
    batch_size: int,
    generator: torch.Generator,
) -> Objective:
    """An objective for `train_quantizers`: squared distance of eps_Q(x_t, t) to the FP midpoint estimate.
    The targets are kept where the calibration set is: on disk (a `targets-*` folder beside its calls, removed
    with them) when it is."""
    states = data.sampler_states()
    targets = BlockRecords(
        None if data.store is None else Path(tempfile.mkdtemp(prefix="targets-", dir=data.store.directory))
    )
    for batch in second_order_targets(fp_model, states, scheduler):
        targets.append((batch,), {})

    def objective(_it: int) -> float:
        index = torch.randint(len(states), (batch_size,), generator=generator)
        batch = states.batch(index)
        eps = batch.estimate(q_model, batch.samples, states.timesteps[index])
        (target,), _ = targets.gather(index, eps.device)
        loss = (eps - target).pow(2).flatten(1).sum(1).mean()
        loss.backward()
        return loss.item()

    return objective
