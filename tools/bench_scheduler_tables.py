"""The device loop against diffusers' own: for each sampler the project supports (Karras sigmas too), the demo
model's samples from the runtime (the scheduler table, numpy, float32) and from diffusers' scheduler loop (torch),
both from the same initial and per-step noise, corrections off. Max absolute difference over the samples.

    python tools/bench_scheduler_tables.py [--n 16] [--no-write] [--smoke]
"""

from __future__ import annotations

import argparse

import numpy as np
from benchdoc import header, parse_options, publish

from stepquant.models import EpsilonModel, load_model
from stepquant.models.denoisers import sample_shape
from stepquant.models.schedulers import DiffusersNoise, capture_table, diffusers_samples
from stepquant.models.torch_backend import TorchBackend
from stepquant.runtime import SamplerConfig, sample

SAMPLERS = [
    SamplerConfig("ddim", 25, 0.0),
    SamplerConfig("ddim", 25, 1.0),
    SamplerConfig("ddim", 50, 0.5),
    SamplerConfig("ddpm", 25),
    SamplerConfig("ddpm", 100),
    SamplerConfig("dpm-solver++", 20),
    SamplerConfig("dpm-solver++", 20, karras_sigmas=True),
    SamplerConfig("euler", 25),
    SamplerConfig("euler", 25, karras_sigmas=True),
    SamplerConfig("euler-ancestral", 25),
    SamplerConfig("unipc", 20),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--no-write", action="store_true")
    args = parse_options(parser, n=2)
    loaded = load_model("demo-digits")
    backend, schedule, shape = (
        TorchBackend(EpsilonModel(loaded.denoiser)),
        loaded.scheduler_config,
        sample_shape(loaded.denoiser),
    )
    seeds = list(range(args.n))
    lines = [
        header(),
        "",
        f"Demo model, {args.n} seeds, the same noise on both sides (corrections off):",
        "",
        "| sampler | max abs difference (runtime table vs diffusers loop) | samples' range |",
        "|---|---|---|",
    ]
    for config in SAMPLERS:
        ours = sample(
            backend,
            capture_table(config, schedule),
            seeds,
            shape,
            config,
            progress=False,
            clip=False,
            noise_streams=lambda s: [DiffusersNoise(seed) for seed in s],
        ).samples
        theirs = diffusers_samples(backend, config, schedule, seeds, shape)
        lines.append(
            f"| {config.describe()} | {np.abs(ours - theirs).max():.2e} | [{theirs.min():.2f}, {theirs.max():.2f}] |"
        )
    publish("scheduler_tables", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
