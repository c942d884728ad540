"""The samplers a bundle stores: each one's scheduler table, captured from diffusers, and, where the bundle has
correction terms, terms fitted along that sampler's own trajectories. `add_sampler` stores one more in an
exported bundle without recalibrating: its Q/DQ graphs and scales stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from stepquant.bundle import Bundle, TimestepGroup
from stepquant.bundle.manifest import StoredSampler, Target
from stepquant.bundle.targets import TARGETS
from stepquant.calibrators.corrections import estimate_corrections
from stepquant.calibrators.data import CALIBRATION_SEED_OFFSET
from stepquant.eval import psnr
from stepquant.export.bundle import extend_bundle
from stepquant.models.schedulers import capture_table
from stepquant.runtime.backend import Backend
from stepquant.runtime.bundle_backends import graph_backend, reference_backend
from stepquant.runtime.corrections import Corrections
from stepquant.runtime.guidance import Conditioning
from stepquant.runtime.sampler import SamplerConfig, sample
from stepquant.runtime.scheduler_table import SchedulerTable
from stepquant.runtime.text_to_image import LatentDecoder

CORRECTIONS_FILE = "corrections.safetensors"


def correction_file(index: int) -> str:
    """The correction terms of the bundle's `index`-th stored sampler."""
    return CORRECTIONS_FILE if index == 0 else f"corrections_{index}.safetensors"


def check_samplers(samplers: Sequence[SamplerConfig]) -> None:
    """Refuse, in one line, a sampler given twice or samplers guided at different scales."""
    specs = [s.spec for s in samplers]
    if len(set(specs)) < len(specs):
        raise ValueError(f"--sampler {next(s for s in specs if specs.count(s) > 1)} is given twice")
    if len({s.guidance_scale for s in samplers}) > 1:
        raise ValueError("every stored sampler is guided at the bundle's --guidance-scale")


def serving(groups: list[TimestepGroup], timesteps: Sequence[float]) -> list[TimestepGroup]:
    """`groups` also serving `timesteps`: a timestep no group serves joins the group of the nearest one served
    (a single graph serves every timestep already)."""
    if any(group.timesteps == "all" for group in groups):
        return groups
    members = [list(group.timesteps) for group in groups]
    group_of = {float(t): g for g, group in enumerate(members) for t in group}
    for t in map(float, timesteps):
        if t not in group_of:
            group_of[t] = group_of[min(group_of, key=lambda served: abs(served - t))]
            members[group_of[t]].append(t)
    return [replace(group, timesteps=sorted(m, reverse=True)) for group, m in zip(groups, members)]


def sampler_quality(
    fp: Backend,
    quantized: Backend,
    table: SchedulerTable,
    sampler: SamplerConfig,
    seeds: range,
    shape: tuple[int, int, int],
    *,
    latent: bool,
    conditioning: Conditioning | None = None,
    corrections: Corrections | None = None,
    decode: Callable[[np.ndarray], np.ndarray] | None = None,
    fp_by: str = "torch",
    progress: bool = True,
) -> dict:
    """One stored sampler's PSNR to FP, as the export measures the first one's: the same seeds through the FP
    model (`fp`) and the quantized graphs with the sampler's terms, decoded by the VAE where the bundle has one
    (else latents over the FP latents' peak-to-peak range)."""
    runs: dict[str, np.ndarray] = {}
    for name, backend, terms in (("FP", fp, None), ("quantized", quantized, corrections)):
        runs[name] = sample(
            backend,
            table,
            seeds,
            shape,
            sampler,
            progress=progress,
            desc=f"{sampler.spec} {name} samples",
            corrections=terms,
            conditioning=conditioning,
            clip=not latent,
        ).samples
        if decode is not None:
            runs[name] = decode(runs[name])
    return quality_record(runs["quantized"], runs["FP"], seeds, latent=latent, decoded=decode is not None, fp_by=fp_by)


def quality_record(
    quantized: np.ndarray, fp: np.ndarray, seeds: range, *, latent: bool, decoded: bool, fp_by: str = "torch"
) -> dict:
    """PSNR to FP of samples from the same `seeds`, as the manifest records it: images in [-1, 1] (pixels, or
    latents `decoded` by the bundle's VAE), else latents over the FP latents' peak-to-peak range."""
    data_range = float(fp.max() - fp.min()) if latent and not decoded else 2.0
    scores = psnr(quantized, fp, data_range)
    return {
        "psnr_to_fp_db_mean": float(scores.mean()),
        "psnr_to_fp_db_min": float(scores.min()),
        "samples": len(seeds),
        "seeds": [seeds[0], seeds[-1]],
        "space": "image" if decoded else "latent" if latent else "pixel",
        "psnr_data_range": data_range,
        "fp": fp_by,
        "executed_by": "onnxruntime CPUExecutionProvider",
    }


def calibration_seeds(bundle: Bundle) -> list[int]:
    """The seeds of the trajectories the bundle was calibrated on (its corrections were fitted along them)."""
    calibration = bundle.manifest.info.get("calibration") or {}
    return [
        CALIBRATION_SEED_OFFSET + int(calibration.get("seed", 0)) + i
        for i in range(int(calibration.get("trajectories", 64)))
    ]


def _first_target(bundle: Bundle, targets: dict[str, Target]) -> Backend:
    """The first target's Q/DQ graphs on onnxruntime, routed by `targets`' timestep groups."""
    name, target = next(iter(targets.items()))
    return graph_backend(
        [bundle.file(group.graph) for group in target.timestep_groups],
        target.timestep_groups,
        optimization_level=TARGETS[name].optimization_level,
    )


def fit_corrections(
    bundle: Bundle,
    fp: Backend,
    quantized: Backend,
    sampler: SamplerConfig,
    conditioning: Conditioning | None,
    progress: bool = True,
) -> Corrections:
    """The bundle's correction method fitted for `sampler` from the bundle alone: its FP32 reference graph
    (`fp`) against its `quantized` graphs on onnxruntime, along the calibration seeds' trajectories."""
    manifest = bundle.manifest
    seeds = calibration_seeds(bundle)
    rows = None if conditioning is None else conditioning.at(range(len(seeds)))
    return estimate_corrections(
        manifest.correction_method,
        fp,
        quantized,
        manifest.noise_schedule,
        seeds,
        manifest.sample_shape,
        sampler,
        progress,
        rows,
        per_branch=manifest.info.get("correction_fit") == "per branch",
    )


def evaluation_seeds(bundle: Bundle, count: int | None = None) -> range:
    """The seeds the export measured quality on (its first target's), or `count` of them from the same start."""
    quality = next(iter(bundle.manifest.targets.values())).details.get("quality", {})
    first, last = quality.get("seeds", [0, 255])
    return range(first, first + (count or last - first + 1))


def add_sampler(
    bundle: Bundle,
    sampler: SamplerConfig,
    conditioning: Conditioning | None = None,
    sign_key: Path | None = None,
    progress: bool = True,
    eval_samples: int | None = None,
) -> Bundle:
    """Store `sampler` (guided at the bundle's scale) in `bundle`: its table, the timestep groups extended to
    its timesteps, where the bundle has corrections its own terms, and its PSNR to FP (the FP32 reference
    graph's samples; a conditional bundle needs `conditioning` for it); the bundle is rewritten atomically and
    signed with `sign_key` (the caller refuses a signed bundle without one)."""
    manifest = bundle.manifest
    sampler = replace(sampler, guidance_scale=manifest.sampler.guidance_scale)
    if manifest.stored(sampler.key) is not None:
        raise ValueError(f"bundle {bundle.path} stores {sampler.spec} already")
    if manifest.conditions and manifest.correction_method != "none" and conditioning is None:
        raise ValueError(
            f"bundle {bundle.path} is conditional and has {manifest.correction_method} terms to fit for the "
            "new sampler: pass the conditioning it was exported with (--classes, --conditioning or "
            "--prompts-file)"
        )
    table = capture_table(sampler, manifest.noise_schedule)
    targets = {
        name: replace(target, timestep_groups=serving(target.timestep_groups, table.timesteps.tolist()))
        for name, target in manifest.targets.items()
    }
    fp, quantized = reference_backend(bundle), _first_target(bundle, targets)
    corrections = None
    if manifest.correction_method != "none":
        corrections = fit_corrections(bundle, fp, quantized, sampler, conditioning, progress)
    quality = {}
    if conditioning is not None or not manifest.conditions:
        decode = LatentDecoder.of(bundle).in_batches if manifest.text_to_image is not None else None
        quality = sampler_quality(
            fp,
            quantized,
            table,
            sampler,
            evaluation_seeds(bundle, eval_samples),
            manifest.sample_shape,
            latent=manifest.sample_space == "latent",
            conditioning=conditioning,
            corrections=corrections,
            decode=decode,
            fp_by="the FP32 reference graph",
            progress=progress,
        )
    file = correction_file(len(manifest.samplers)) if corrections is not None else None
    if file in manifest.files:
        raise ValueError(f"bundle {bundle.path} already lists a file {file}")
    entry = StoredSampler(sampler.to_record(), table.to_dict(), file, quality)

    def write(staging: Path) -> None:
        if corrections is not None:
            corrections.save(staging / file)

    return extend_bundle(
        bundle, write, replace(manifest, samplers=(*manifest.samplers, entry), targets=targets), sign_key
    )
