"""Multi-step calibration (AccuQuant): start the FP and the quantized model from the same x_t, run n
consecutive DDIM steps with each, and minimise the distance of the two results. Conditional models keep
each state's conditioning along the chain, guided as the sampler guides them.

Memory stays constant in n: the unrolled n-step graph is never kept. A no-grad pass stores only the n
input states (B x C x H x W each); the backward pass then walks the chain in reverse, rebuilding one
step's graph at a time from its stored state and passing the state gradient on (gradient
checkpointing per sampler step). The gradient is the exact one of the unrolled chain, at about twice
its compute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stepquant.calibrators.data import CalibrationSet, StateBatch
from stepquant.runtime.scheduler_table import SchedulerTable

Objective = Callable[[int], float]


def _step(model: nn.Module, table: SchedulerTable, states: StateBatch, x: torch.Tensor, i: int) -> torch.Tensor:
    """Step i of the deterministic sampler the table describes from x, which `states` moved to,
    differentiable (the table's step is plain arithmetic)."""
    return table.step(i, [x], [states.estimate(model, x, torch.full((len(x),), float(table.timesteps[i])))])


def _run(model: nn.Module, table: SchedulerTable, states: StateBatch, x: torch.Tensor, chain: range) -> torch.Tensor:
    for i in chain:
        x = _step(model, table, states, x, i)
    return x


def _trajectory_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (x - target).pow(2).flatten(1).sum(1).mean()


def multistep_objective(
    fp_model: nn.Module,
    q_model: nn.Module,
    data: CalibrationSet,
    table: SchedulerTable,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    unrolled: bool = False,
) -> Objective:
    """An objective for `train_quantizers`: each call draws a start step and a batch of calibration states
    there, and back-propagates the n-step trajectory loss (constant memory unless `unrolled`). `table` is a
    deterministic, memoryless sampler (DDIM with eta 0)."""
    if table.stochastic or table.depth != 1:
        raise ValueError("multi-step calibration unrolls a deterministic one-step sampler (DDIM, eta 0)")
    timesteps = [int(t) for t in table.timesteps]
    states = data.sampler_states()
    starts = [k for k, t in enumerate(timesteps) if len(states.at_timestep(float(t)))]
    if not starts:
        raise ValueError("the calibration set holds no state at any of the sampler's timesteps")

    def objective(_it: int) -> float:
        k = starts[int(torch.randint(len(starts), (1,), generator=generator))]
        chain = range(k, min(k + steps, len(timesteps)))
        pool = states.at_timestep(float(timesteps[k]))
        batch = states.batch(pool[torch.randint(len(pool), (batch_size,), generator=generator)])
        x = batch.samples
        with torch.no_grad():
            target = _run(fp_model, table, batch, x, chain)
        if unrolled:
            loss = _trajectory_loss(_run(q_model, table, batch, x, chain), target)
            loss.backward()
            return loss.item()
        inputs = []
        with torch.no_grad():
            for i in chain:
                inputs.append(x)
                x = _step(q_model, table, batch, x, i)
            loss = _trajectory_loss(x, target)
        grad_state = 2 * (x - target) / len(x)  # d loss / d final state
        for state, i in zip(reversed(inputs), reversed(chain)):
            state = state.clone().requires_grad_(True)
            _step(q_model, table, batch, state, i).backward(grad_state)
            grad_state = state.grad
        return loss.item()

    return objective
