"""The sampler host loop: a diffusers scheduler drives any backend from seeded noise.

Every sample owns a generator seeded with its own seed, used for its initial noise and then for
its per-step noise, so sample i is the same whatever the batch size or backend. That is what makes
FP and quantized runs comparable sample by sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm import tqdm

from stepquant.runtime.backend import Backend
from stepquant.runtime.corrections import Corrections
from stepquant.runtime.guidance import Conditioning, guided_estimate
from stepquant.runtime.seeding import per_sample_noise, seed_generators

SCHEDULERS: dict[str, type[SchedulerMixin]] = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}

CORRECTION_NOISE_SEED_OFFSET = 1 << 40

# Called before each network evaluation with (step index, timestep, x_t of the batch).
StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class SamplerConfig:
    """`eta` is DDIM's stochasticity (0: deterministic); DDPM is always stochastic and ignores it.
    `guidance_scale` is classifier-free guidance's weight for conditional models (1: no guidance)."""

    scheduler: str = "ddim"
    steps: int = 25
    eta: float = 0.0
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"--eta must be in [0, 1], got {self.eta}")
        if not 0.0 <= self.guidance_scale < float("inf"):
            raise ValueError(f"--guidance-scale must be a finite number of at least 0, got {self.guidance_scale}")


@dataclass
class SampleOutput:
    samples: torch.Tensor  # [N, C, H, W] float32 (in [-1, 1] when clipped), in the order of the seeds


def make_scheduler(config: SamplerConfig, scheduler_config: dict) -> SchedulerMixin:
    """The sampler's scheduler built from the model's training noise schedule, timesteps set; a schedule
    diffusers cannot build (an unknown beta_schedule, a bad value) is refused with one line."""
    try:
        scheduler = SCHEDULERS[config.scheduler].from_config(scheduler_config)
        scheduler.set_timesteps(config.steps)
    except (NotImplementedError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"the noise schedule cannot drive a {config.scheduler.upper()} sampler with {config.steps} steps: "
                         f"{' '.join(str(err).split())[:200]}") from err
    return scheduler


def ddim_step(scheduler: DDIMScheduler, eps: torch.Tensor, timestep: int, x: torch.Tensor, eta: float,
              generators: Sequence[torch.Generator], residual_var: float = 0.0) -> torch.Tensor:
    """One DDIM update (diffusers' formulas, epsilon prediction) with PTQD's variance schedule calibration:
    sigma'^2 = max(sigma^2 - c_t^2 * residual_var, 0), c_t being the net coefficient of eps in the update,
    so the sampler's own noise makes room for the noise the quantized estimate already carries."""
    prev = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha = scheduler.alphas_cumprod[timestep]
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
    sigma2 = eta**2 * variance
    if residual_var > 0:
        c = (1 - alpha_prev - sigma2).sqrt() - (alpha_prev * (1 - alpha) / alpha).sqrt()
        sigma2 = torch.clamp(sigma2 - c**2 * residual_var, min=0.0)
    x_prev = alpha_prev.sqrt() * x0 + (1 - alpha_prev - sigma2).sqrt() * eps
    return x_prev + sigma2.sqrt() * per_sample_noise(generators, eps.shape[1:]) if eta > 0 else x_prev


def ddpm_step(scheduler: DDPMScheduler, eps: torch.Tensor, timestep: int, x: torch.Tensor,
              generators: Sequence[torch.Generator], residual_var: float = 0.0) -> torch.Tensor:
    """One DDPM ancestral step (diffusers' formulas, epsilon prediction, fixed_small variance) with the same
    variance schedule calibration as `ddim_step`: c_t is the net coefficient of eps in the posterior mean."""
    prev = scheduler.previous_timestep(timestep)
    alpha = scheduler.alphas_cumprod[timestep]
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.one
    beta = 1 - alpha / alpha_prev
    x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    x0_coeff = alpha_prev.sqrt() * beta / (1 - alpha)
    x_prev = x0_coeff * x0 + (1 - beta).sqrt() * (1 - alpha_prev) / (1 - alpha) * x
    if timestep <= 0:
        return x_prev
    sigma2 = torch.clamp((1 - alpha_prev) / (1 - alpha) * beta, min=1e-20)
    if residual_var > 0:
        c = x0_coeff * (1 - alpha).sqrt() / alpha.sqrt()
        sigma2 = torch.clamp(sigma2 - c**2 * residual_var, min=0.0)
    return x_prev + sigma2.sqrt() * per_sample_noise(generators, eps.shape[1:])


def sample_batches(
    backend: Backend,
    scheduler_config: dict,
    seeds: Sequence[int],
    sample_shape: tuple[int, int, int],
    config: SamplerConfig = SamplerConfig(),
    batch_size: int = 64,
    on_step: StepCallback | None = None,
    progress: bool = True,
    desc: str = "sampling",
    corrections: Corrections | None = None,
    conditioning: Conditioning | None = None,
    clip: bool = True,
) -> Iterator[torch.Tensor]:
    """Run the reverse process for every seed, `batch_size` seeds at a time, yielding each batch's final
    samples (clipped to [-1, 1] with `clip`: pixel-space models; latent models leave their latents to the
    VAE), so memory is bounded by the batch however many seeds there are.

    Conditional models need `conditioning` (sample i takes its row i mod P) and are guided with
    `config.guidance_scale`. With `corrections`, each step corrects the network input and output on the
    host (see stepquant.runtime.corrections); without, the loop is exactly diffusers' scheduler loop.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    timesteps = make_scheduler(config, scheduler_config).timesteps  # a schedule it cannot build fails before any bar
    if corrections is not None:
        corrections.check_covers(timesteps)
    starts = range(0, len(seeds), batch_size)
    with tqdm(total=len(starts) * config.steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for start in starts:
            batch_seeds = list(seeds[start : start + batch_size])
            positions = range(start, start + len(batch_seeds))
            scheduler = make_scheduler(config, scheduler_config)
            generators = seed_generators(batch_seeds)
            # noise the corrections add (D2's stochastic variant) has its own streams, so the sampler's own
            # per-step noise stays aligned with an uncorrected (FP) run from the same seeds
            correction_generators = seed_generators([CORRECTION_NOISE_SEED_OFFSET + s for s in batch_seeds])
            x = per_sample_noise(generators, sample_shape)
            extra = {"eta": config.eta} if config.scheduler == "ddim" else {}
            for index, t in enumerate(scheduler.timesteps):
                if on_step is not None:
                    on_step(index, int(t), x)
                timesteps = torch.full((len(batch_seeds),), float(t))
                if corrections is None:
                    eps = guided_estimate(backend, x, timesteps, conditioning, positions, config.guidance_scale)
                    x = scheduler.step(eps, t, x, generator=generators, **extra).prev_sample
                else:
                    x = corrections.correct_input(x, int(t))
                    eps = guided_estimate(backend, x, timesteps, conditioning, positions, config.guidance_scale)
                    eps = corrections.correct_estimate(eps, int(t), correction_generators)
                    residual_var = corrections.residual_variance(int(t))
                    if config.scheduler == "ddim":
                        x = ddim_step(scheduler, eps, int(t), x, config.eta, generators, residual_var)
                    else:
                        x = ddpm_step(scheduler, eps, int(t), x, generators, residual_var)
                bar.update(1)
            yield x.clamp(-1.0, 1.0) if clip else x


def sample(backend: Backend, scheduler_config: dict, seeds: Sequence[int], sample_shape: tuple[int, int, int],
           config: SamplerConfig = SamplerConfig(), batch_size: int = 64, **options) -> SampleOutput:
    """Every seed's final sample, in the order of the seeds (`sample_batches`, concatenated)."""
    return SampleOutput(samples=torch.cat(list(sample_batches(backend, scheduler_config, seeds, sample_shape, config,
                                                               batch_size, **options))))
