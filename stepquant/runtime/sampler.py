"""The sampler host loop: a diffusers scheduler drives any backend from seeded noise.

Every sample owns a generator seeded with its own seed, used for its initial noise and then for
its per-step noise, so sample i is the same whatever the batch size or backend. That is what makes
FP and quantized runs comparable sample by sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm import tqdm

from stepquant.runtime.backend import Backend

SCHEDULERS: dict[str, type[SchedulerMixin]] = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}

# Called before each network evaluation with (step index, timestep, x_t of the batch).
StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class SamplerConfig:
    """`eta` is DDIM's stochasticity (0: deterministic); DDPM is always stochastic and ignores it."""

    scheduler: str = "ddim"
    steps: int = 25
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")


@dataclass
class SampleOutput:
    samples: torch.Tensor  # [N, C, H, W] float32 in [-1, 1], in the order of the seeds


def make_scheduler(config: SamplerConfig, scheduler_config: dict) -> SchedulerMixin:
    """The sampler's scheduler built from the model's training noise schedule, timesteps set."""
    scheduler = SCHEDULERS[config.scheduler].from_config(scheduler_config)
    scheduler.set_timesteps(config.steps)
    return scheduler


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def sample(
    backend: Backend,
    scheduler_config: dict,
    seeds: Sequence[int],
    sample_shape: tuple[int, int, int],
    config: SamplerConfig = SamplerConfig(),
    batch_size: int = 64,
    on_step: StepCallback | None = None,
    progress: bool = True,
    desc: str = "sampling",
) -> SampleOutput:
    """Run the reverse process for every seed; returns final samples clipped to [-1, 1]."""
    batches = [list(seeds[i : i + batch_size]) for i in range(0, len(seeds), batch_size)]
    bar = tqdm(total=len(batches) * config.steps, desc=desc, unit="step", disable=not progress, leave=False)
    outputs = []
    for batch_seeds in batches:
        scheduler = make_scheduler(config, scheduler_config)
        generators = _generators(batch_seeds)
        x = torch.cat([torch.randn((1, *sample_shape), generator=g) for g in generators])
        extra = {"eta": config.eta} if config.scheduler == "ddim" else {}
        for index, t in enumerate(scheduler.timesteps):
            if on_step is not None:
                on_step(index, int(t), x)
            eps = backend(x, torch.full((len(batch_seeds),), float(t)))
            x = scheduler.step(eps, t, x, generator=generators, **extra).prev_sample
            bar.update(1)
        outputs.append(x.clamp(-1.0, 1.0))
    bar.close()
    return SampleOutput(samples=torch.cat(outputs))
