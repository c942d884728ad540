"""diffusers' schedulers, and the capture of their sampler steps as a scheduler table for the runtime.

The update is not re-derived here: the scheduler itself is run on probe inputs. Its arithmetic is
element-wise with per-step scalars, so a "sample" whose elements are coefficients over the variables
(initial noise, each step's network output) is carried through the real `step()` and comes out as the
coefficients of the new sample; a least-squares fit over the step's inputs (current and earlier samples and
outputs, and the noise the scheduler drew, reproduced from its generator) reads them off exactly, and a
residual over 1e-6 (relative) refuses the scheduler. Clipping of the predicted x0 is the one non-linear part: it is
probed separately, and the finished table is checked step by step against the scheduler on random inputs.
"""

from __future__ import annotations

import copy
import inspect
import json
from functools import lru_cache

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from stepquant.runtime.sampler import SCHEDULER_NAMES, SamplerConfig
from stepquant.runtime.scheduler_table import SchedulerTable, SchedulerTableError

# stepquant's name -> diffusers' class and the options that make it that sampler (the rest of the config is the
# model's training noise schedule)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "dpm-solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES
MAX_HISTORY = 3  # past samples and outputs a step may read (third-order multistep solvers)
_SPARE = 8  # extra probe coordinates, so drawn noise is never in the span of the structured columns
_FIT_TOLERANCE = 1e-6  # relative: some schedulers compute in float32 whatever the probe's dtype
_ZERO_NOISE = 1e-9
_CHECK_TOLERANCE = 1e-5


def make_scheduler(config: SamplerConfig, scheduler_config: dict) -> SchedulerMixin:
    """The sampler's scheduler built from the model's training noise schedule, timesteps set; a schedule
    diffusers cannot build (an unknown beta_schedule, a bad value) is refused with one line."""
    cls, options = SCHEDULERS[config.scheduler]
    if config.karras_sigmas:
        if not _takes(cls, "use_karras_sigmas"):
            raise ValueError(
                f"--karras-sigmas: diffusers' {cls.__name__} ({config.scheduler}) has no Karras sigmas; "
                f"choose from {', '.join(n for n, (c, _) in SCHEDULERS.items() if _takes(c, 'use_karras_sigmas'))}"
            )
        options = {**options, "use_karras_sigmas": True}
    try:
        scheduler = cls.from_config({**scheduler_config, **options})
        scheduler.set_timesteps(config.steps)
    except (NotImplementedError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(
            f"the noise schedule cannot drive a {config.scheduler.upper()} sampler with {config.steps} steps: "
            f"{' '.join(str(err).split())[:200]}"
        ) from err
    return scheduler


def _takes(cls: type, option: str) -> bool:
    """Whether diffusers' scheduler class has the config option (a DDPM config carries options others ignore)."""
    return option in inspect.signature(cls.__init__).parameters


def _step(scheduler: SchedulerMixin, config: SamplerConfig, output, t, sample, generator):
    extra = {"eta": config.eta} if config.scheduler == "ddim" else {}
    if "generator" in inspect.signature(scheduler.step).parameters:  # deterministic solvers (UniPC) take none
        extra["generator"] = generator
    scheduler.scale_model_input(sample, t)  # as a pipeline does before each step (Euler checks it was called)
    return scheduler.step(output, t, sample, **extra)


def _fit(columns: list[torch.Tensor], target: torch.Tensor, what: str, required: bool = True) -> np.ndarray | None:
    """Coefficients c with sum c_k columns_k == target, exactly (else the step is not linear in them: an
    error, or None where not `required`)."""
    matrix = torch.stack(columns, dim=1).numpy()
    y = target.numpy()
    coefficients, *_ = np.linalg.lstsq(matrix, y, rcond=None)
    residual = np.abs(matrix @ coefficients - y).max()
    if residual <= _FIT_TOLERANCE * max(1.0, np.abs(y).max()):
        return coefficients
    if not required:
        return None
    raise SchedulerTableError(
        f"{what} is not a linear combination of the current and {MAX_HISTORY - 1} earlier samples "
        f"and outputs (residual {residual:.2g}): this scheduler cannot be captured"
    )


def _clip_weight(
    linear: SchedulerMixin, clipped: SchedulerMixin, config: SamplerConfig, t, x0_from_output: float, clip: float
) -> float:
    """The weight of the clipped x0 in the update: one step at x = 0 with an output whose x0 lies at twice the
    clip range, with and without clipping (same noise), differs by weight * (clip - 2 clip)."""
    output = torch.full((1, 1), 2 * clip / x0_from_output, dtype=torch.float64)
    zero = torch.zeros((1, 1), dtype=torch.float64)
    results = [
        _step(copy.deepcopy(s), config, output, t, zero, torch.Generator().manual_seed(0)).prev_sample
        for s in (clipped, linear)
    ]
    return float((results[0] - results[1]) / -clip)


def _capture(config: SamplerConfig, scheduler_config: dict) -> SchedulerTable:
    """The table of `config` (eta already 0 for samplers other than DDIM: `capture_table`)."""
    if scheduler_config.get("thresholding"):
        raise SchedulerTableError(
            "dynamic thresholding clips each sample by its own quantile, which no per-step table "
            "describes: export with thresholding off"
        )
    clipped = make_scheduler(config, scheduler_config)
    clipping = _takes(type(clipped), "clip_sample") and clipped.config.get("clip_sample")
    clip = float(clipped.config.get("clip_sample_range", 1.0)) if clipping else None
    linear = make_scheduler(config, {**scheduler_config, "clip_sample": False})
    steps = len(linear.timesteps)
    size = 1 + steps + _SPARE
    basis = torch.eye(size, dtype=torch.float64)
    init = basis[0] * float(linear.init_noise_sigma)
    samples, outputs = [init], []
    generator = torch.Generator().manual_seed(0)
    rows: dict[str, list] = {
        name: [] for name in ("input_scale", "x0_from_sample", "x0_from_output", "from_x0", "noise_std")
    }
    history: dict[str, list] = {"from_sample": [], "from_output": []}
    for i, t in enumerate(linear.timesteps):
        x = samples[-1]
        scaled = linear.scale_model_input(x[None], t)[0]
        rows["input_scale"].append(float(_fit([x], scaled, f"step {i}'s model input")[0]))
        outputs.append(basis[1 + i])
        state = generator.get_state()
        result = _step(linear, config, outputs[-1][None], t, x[None], generator)
        drew = not torch.equal(state, generator.get_state())
        noise = (
            randn_tensor((1, size), generator=torch.Generator().set_state(state), dtype=torch.float64)[0]
            if drew
            else None
        )
        # the shortest history that explains the update: earlier samples are themselves combinations of earlier
        # samples and outputs, so a longer one than needed would spread the weights arbitrarily
        for depth in range(1, min(MAX_HISTORY, len(samples)) + 1):
            columns = [c for k in range(depth) for c in (samples[-1 - k], outputs[-1 - k])]
            fitted = _fit(
                columns + ([noise] if drew else []),
                result.prev_sample[0],
                f"step {i}'s update",
                required=depth == min(MAX_HISTORY, len(samples)),
            )
            if fitted is not None:
                break
        a = np.zeros(MAX_HISTORY)
        b = np.zeros(MAX_HISTORY)
        a[:depth], b[:depth] = fitted[0 : 2 * depth : 2], fitted[1 : 2 * depth : 2]
        p = q = c = 0.0
        if clip is not None:
            p, q = _fit([x, outputs[-1]], result.pred_original_sample[0], f"step {i}'s predicted x0")
            c = _clip_weight(linear, clipped, config, t, q, clip)
            a[0], b[0] = a[0] - c * p, b[0] - c * q
        rows["x0_from_sample"].append(p)
        rows["x0_from_output"].append(q)
        rows["from_x0"].append(c)
        std = abs(float(fitted[-1])) if drew else 0.0
        rows["noise_std"].append(std if std > _ZERO_NOISE else 0.0)  # DDIM's last step draws noise it scales by ~1e-15
        history["from_sample"].append(a)
        history["from_output"].append(b)
        samples.append(result.prev_sample[0])
    used = max(
        (k + 1 for row in history["from_sample"] + history["from_output"] for k in range(MAX_HISTORY) if row[k]),
        default=1,
    )
    return SchedulerTable(
        scheduler=config.scheduler,
        steps=steps,
        eta=config.eta,
        karras_sigmas=config.karras_sigmas,
        prediction_type=str(linear.config.get("prediction_type", "epsilon")),
        init_noise_sigma=float(linear.init_noise_sigma),
        clip=clip,
        timesteps=linear.timesteps.double().numpy(),
        **{k: np.asarray(v) for k, v in rows.items()},
        **{k: np.stack(v)[:, :used] for k, v in history.items()},
        source={
            "class": type(clipped).__name__,
            "config": {k: v for k, v in clipped.config.items() if not k.startswith("_")},
        },
    )


def check_table(table: SchedulerTable, config: SamplerConfig, scheduler_config: dict, seed: int = 0) -> None:
    """Run the scheduler and the table side by side on random float32 inputs, each step from the scheduler's
    own state: they must agree within 1e-5, noise included. Outputs span 1e-3 to 3 in size, so at every step
    some predicted x0 fall inside the clip range and some outside."""
    scheduler = make_scheduler(config, scheduler_config)
    rng = torch.Generator().manual_seed(seed)
    shape = (3, 2, 4, 4)
    x = torch.randn(shape, generator=rng) * float(scheduler.init_noise_sigma)
    samples, outputs = [x.numpy()], []
    generator = torch.Generator().manual_seed(seed + 1)
    for i, t in enumerate(scheduler.timesteps):
        output = torch.randn(shape, generator=rng) * 10 ** (torch.rand(shape, generator=rng) * 3.5 - 3.0)
        outputs.insert(0, output.numpy())
        state = generator.get_state()
        expected = _step(scheduler, config, output, t, torch.from_numpy(samples[0]), generator).prev_sample.numpy()
        noise = randn_tensor(shape, generator=torch.Generator().set_state(state), dtype=torch.float32).numpy()
        got = table.step(i, samples, outputs, noise)
        error = float(np.abs(got - expected).max())
        if error > _CHECK_TOLERANCE * max(1.0, float(np.abs(expected).max())):
            raise SchedulerTableError(
                f"the captured {table.describe()} table departs from diffusers' {type(scheduler).__name__} "
                f"at step {i} by {error:.2g}"
            )
        samples.insert(0, expected)


class DiffusersNoise:
    """A sample's noise as diffusers' pipelines draw it from a list of torch generators, one (1, ...) draw per
    sample and call: given to the runtime's sampler as its noise stream, it sees the noise `diffusers_samples` sees."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(int(seed))

    def standard_normal(self, size, dtype=np.float32) -> np.ndarray:
        return torch.randn((1, *size), generator=self.generator).numpy()[0].astype(dtype, copy=False)


def diffusers_samples(backend, config: SamplerConfig, scheduler_config: dict, seeds, shape) -> np.ndarray:
    """The reference the runtime loop is held to: diffusers' own scheduler loop (no clipping of the result), on
    any backend of the runtime's contract, with each seed's noise from `DiffusersNoise`."""
    scheduler = make_scheduler(config, scheduler_config)
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    x = torch.cat([torch.randn((1, *shape), generator=g) for g in generators]) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        out = torch.from_numpy(
            backend(np.ascontiguousarray(model_input.numpy()), np.full(len(generators), float(t), dtype=np.float32))
        )
        x = _step(scheduler, config, out, t, x, generators).prev_sample
    return x.numpy()


@lru_cache(maxsize=32)
def _cached(config: SamplerConfig, schedule_json: str) -> SchedulerTable:
    schedule = json.loads(schedule_json)
    try:
        table = _capture(config, schedule)
    except SchedulerTableError:
        raise
    except (IndexError, AssertionError, ValueError, RuntimeError) as err:  # inside diffusers' own scheduler
        raise SchedulerTableError(
            f"diffusers' {config.scheduler} scheduler fails on this model's noise schedule with "
            f"{config.describe()} ({type(err).__name__}: {' '.join(str(err).split()) or 'no message'}): "
            "diffusers' own pipeline would fail too; choose other steps or sigmas"
        ) from err
    check_table(table, config, schedule)
    return table


def capture_table(config: SamplerConfig, scheduler_config: dict) -> SchedulerTable:
    """The scheduler table of sampler `config` on the model's noise schedule, captured from diffusers' own
    scheduler and checked against it (cached: export, calibration and evaluation ask for the same one)."""
    return _cached(
        SamplerConfig(
            config.scheduler,
            config.steps,
            config.eta if config.scheduler == "ddim" else 0.0,
            karras_sigmas=config.karras_sigmas,
        ),
        json.dumps(scheduler_config, sort_keys=True),
    )
