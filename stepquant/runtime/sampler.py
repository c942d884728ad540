"""The sampler host loop: a scheduler table drives any backend from seeded noise, in numpy.

Every sample owns a generator seeded with its own seed, used for its initial noise and then for its per-step
noise, so sample i is the same whatever the batch size, backend or install. That is what makes FP and
quantized runs comparable sample by sample. The update is the scheduler's own, captured as a table
(stepquant.runtime.scheduler_table), so this loop is the same for every scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from tqdm import tqdm

from stepquant.bundle.manifest import Sampler
from stepquant.runtime.backend import Backend
from stepquant.runtime.corrections import Corrections
from stepquant.runtime.guidance import Conditioning, guided_estimate
from stepquant.runtime.scheduler_table import SchedulerTable
from stepquant.runtime.seeding import NoiseStream, per_sample_noise, seed_generators

# diffusers' DDIM, DDPM, DPM-Solver++ (multistep), Euler, Euler ancestral and UniPC schedulers, captured at export
SCHEDULER_NAMES = ("ddim", "ddpm", "dpm-solver++", "euler", "euler-ancestral", "unipc")
ETA_SCHEDULERS = ("ddim",)  # the schedulers whose step takes an eta

CORRECTION_NOISE_SEED_OFFSET = 1 << 40

# Called before each network evaluation with (step index, timestep, x_t of the batch).
StepCallback = Callable[[int, float, np.ndarray], None]


@dataclass(frozen=True)
class SamplerConfig:
    """`eta` is DDIM's stochasticity (0: deterministic); DDPM and Euler ancestral are always stochastic, the
    others deterministic, and have none (a non-zero eta for them is refused, not ignored). `karras_sigmas`
    spaces the steps by Karras et al.'s sigmas (the schedulers that have the option). `guidance_scale` is
    classifier-free guidance's weight for conditional models (1: no guidance)."""

    scheduler: str = "ddim"
    steps: int = 25
    eta: float = 0.0
    guidance_scale: float = 1.0
    karras_sigmas: bool = False

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULER_NAMES)}")
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"--eta must be in [0, 1], got {self.eta}")
        if self.eta and self.scheduler not in ETA_SCHEDULERS:
            raise ValueError(
                f"--eta {self.eta:g}: the {self.scheduler} scheduler has no eta (only {', '.join(ETA_SCHEDULERS)} "
                "does): drop --eta"
            )
        if not 0.0 <= self.guidance_scale < float("inf"):
            raise ValueError(f"--guidance-scale must be a finite number of at least 0, got {self.guidance_scale}")

    def overridden(self, **options) -> SamplerConfig:
        """This sampler with the options a command was given (None: not given, keep this one's)."""
        return replace(self, **{name: value for name, value in options.items() if value is not None})

    def to_record(self) -> Sampler:
        """The manifest's sampler record (the same fields, as plain data)."""
        return Sampler(**asdict(self))

    @classmethod
    def from_record(cls, record: Sampler) -> SamplerConfig:
        """The sampler a manifest records, checked as any other."""
        return cls(**asdict(record))

    @classmethod
    def parse(cls, spec: str, guidance_scale: float = 1.0) -> SamplerConfig:
        """A sampler from its `--sampler` spec, SCHEDULER:STEPS[:karras][:eta=E] (`ddim:25`,
        `dpm-solver++:20:karras`, `ddim:50:eta=1`); one line naming the spec when it does not parse."""
        usage = (
            f"sampler {spec!r} does not parse: write SCHEDULER:STEPS[:karras][:eta=E], e.g. ddim:25 or "
            "dpm-solver++:20:karras"
        )
        scheduler, _, rest = spec.strip().partition(":")
        fields = rest.split(":") if rest else []
        if not fields or not fields[0].isdigit():
            raise ValueError(usage)
        options = {"karras_sigmas": False, "eta": 0.0}
        for extra in fields[1:]:
            if extra == "karras" and not options["karras_sigmas"]:
                options["karras_sigmas"] = True
            elif extra.startswith("eta="):
                try:
                    options["eta"] = float(extra[4:])
                except ValueError:
                    raise ValueError(usage) from None
            else:
                raise ValueError(usage)
        try:
            return cls(scheduler, int(fields[0]), guidance_scale=guidance_scale, **options)
        except ValueError as err:
            raise ValueError(f"sampler {spec!r}: {err}") from None

    @property
    def key(self) -> tuple[str, int, float, bool]:
        return self.to_record().key

    @property
    def fields(self) -> dict:
        """What picks a stored sampler (`bundle_sampler(bundle, **config.fields)`): all but the guidance scale."""
        return {"scheduler": self.scheduler, "steps": self.steps, "eta": self.eta, "karras_sigmas": self.karras_sigmas}

    @property
    def spec(self) -> str:
        return self.to_record().spec

    def describe(self) -> str:
        return (
            f"{self.steps} {self.scheduler.upper()} steps"
            + (f", eta {self.eta:g}" if self.scheduler == "ddim" else "")
            + (", Karras sigmas" if self.karras_sigmas else "")
        )


@dataclass
class SampleOutput:
    samples: np.ndarray  # [N, C, H, W] float32 (in [-1, 1] when clipped), in the order of the seeds


def sample_batches(
    backend: Backend,
    table: SchedulerTable,
    seeds: Sequence[int],
    sample_shape: tuple[int, ...],
    config: SamplerConfig = SamplerConfig(),
    batch_size: int = 64,
    on_step: StepCallback | None = None,
    progress: bool = True,
    desc: str = "sampling",
    corrections: Corrections | None = None,
    conditioning: Conditioning | None = None,
    clip: bool = True,
    noise_streams: Callable[[Sequence[int]], Sequence[NoiseStream]] = seed_generators,
) -> Iterator[np.ndarray]:
    """Run the reverse process of `table` for every seed, `batch_size` seeds at a time, yielding each batch's
    final samples (clipped to [-1, 1] with `clip`: pixel-space models; latent models leave their latents to
    the VAE), so memory is bounded by the batch however many seeds there are.

    `config` must name the table's sampler (else one line says which the table is). Conditional models need
    `conditioning` (sample i takes its row i mod P) and are guided with `config.guidance_scale`. With
    `corrections`, each step corrects the network input and output on the host (stepquant.runtime.corrections);
    without, the loop is exactly the scheduler's. `noise_streams` makes each sample's stream from its seed.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    table.check_sampler(config.scheduler, config.steps, config.eta, config.karras_sigmas)
    if corrections is not None:
        corrections.check_covers([int(t) for t in table.timesteps])
    starts = range(0, len(seeds), batch_size)
    with tqdm(total=len(starts) * table.steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for start in starts:
            batch_seeds = list(seeds[start : start + batch_size])
            positions = range(start, start + len(batch_seeds))
            streams = noise_streams(batch_seeds)
            # noise the corrections add (D2's stochastic variant) has its own streams, so the sampler's own
            # per-step noise stays aligned with an uncorrected (FP) run from the same seeds
            correction_streams = noise_streams([CORRECTION_NOISE_SEED_OFFSET + s for s in batch_seeds])
            x = np.float32(table.init_noise_sigma) * per_sample_noise(streams, sample_shape)
            samples: list[np.ndarray] = []
            outputs: list[np.ndarray] = []
            for i, t in enumerate(table.timesteps.tolist()):
                if on_step is not None:
                    on_step(i, t, x)
                if corrections is not None:
                    x = corrections.correct_input(x, int(t))
                timesteps = np.full((len(batch_seeds),), t, dtype=np.float32)
                model_input = x if table.input_scale[i] == 1.0 else np.float32(table.input_scale[i]) * x
                out = guided_estimate(backend, model_input, timesteps, conditioning, positions, config.guidance_scale)
                std = float(table.noise_std[i])
                if corrections is not None:
                    out = corrections.correct_estimate(out, int(t), correction_streams)
                    std = corrections.sampler_noise_std(int(t), std, table.output_coefficient(i))
                samples, outputs = table.remember(samples, x), table.remember(outputs, out)
                noise = per_sample_noise(streams, sample_shape) if table.noise_std[i] > 0 else None
                x = np.asarray(table.step(i, samples, outputs, noise, std), dtype=np.float32)
                bar.update(1)
            yield x.clip(-1.0, 1.0) if clip else x


def sample(
    backend: Backend,
    table: SchedulerTable,
    seeds: Sequence[int],
    sample_shape: tuple[int, ...],
    config: SamplerConfig = SamplerConfig(),
    batch_size: int = 64,
    **options,
) -> SampleOutput:
    """Every seed's final sample, in the order of the seeds (`sample_batches`, concatenated)."""
    return SampleOutput(
        samples=np.concatenate(list(sample_batches(backend, table, seeds, sample_shape, config, batch_size, **options)))
    )
