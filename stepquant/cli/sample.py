"""`stepquant sample`: seeded samples from a bundle or an FP model, as a PNG grid or raw .npz."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from stepquant.bundle import load_bundle
from stepquant.cli.choices import Provider, RuntimeBackend, Scheduler
from stepquant.cli.files import check_writable, write_atomically, write_npz_batches
from stepquant.cli.options import (
    BackendOption,
    Classes,
    CorrectionsOption,
    DeviceOption,
    EngineOption,
    ProviderOption,
    StoredSamplerOption,
    TrustKey,
    parse_classes,
    sampler_request,
)
from stepquant.runtime import SamplerConfig
from stepquant.runtime.bundle_backends import bundle_corrections, bundle_sampler, bundle_table, quantized_backend
from stepquant.runtime.guidance import choose_conditioning
from stepquant.runtime.sampler import sample_batches
from stepquant.runtime.seeding import MAX_SEED

MAX_GRID_SAMPLES = 4096  # a PNG grid is built in memory whole; more samples go to an .npz


def _check_out(out: Path, n: int, shape: tuple[int, ...] | None = None) -> None:
    """Refuse an output that cannot be written before any work (it would be thrown away): its type and
    directory at once, its size once the sample `shape` is known (float32 values in an .npz; at most a byte
    per value, uncompressed, in a PNG)."""
    values = n * int(np.prod(shape)) if shape else 0
    check_writable(out, (".png", ".npz"), values * (4 if out.suffix == ".npz" else 1))
    if out.suffix == ".png" and n > MAX_GRID_SAMPLES:
        raise ValueError(f"a PNG grid holds at most {MAX_GRID_SAMPLES} samples, got --n {n}: write an .npz for more")


def sample_command(
    out: Annotated[
        Path,
        typer.Option(
            rich_help_panel="Output",
            help="Output: .png grid or .npz with key 'samples' (N,C,H,W; in [-1, 1], or latents).",
        ),
    ],
    bundle: Annotated[
        Optional[Path], typer.Option(rich_help_panel="Input", help="Bundle to run (onnxruntime).")
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(rich_help_panel="Input", help="FP model to run (torch), seeded exactly as a bundle."),
    ] = None,
    n: Annotated[
        int, typer.Option(rich_help_panel="Sampler", min=1, help="Number of samples (seeds seed .. seed+n-1).")
    ] = 64,
    seed: Annotated[int, typer.Option(rich_help_panel="Sampler", min=0, max=MAX_SEED, help="First seed.")] = 0,
    steps: Annotated[
        Optional[int],
        typer.Option(rich_help_panel="Sampler", min=1, help="Sampler steps (default: the bundle's, else 25)."),
    ] = None,
    eta: Annotated[
        Optional[float],
        typer.Option(rich_help_panel="Sampler", help="DDIM eta (default: the bundle's, else 0: deterministic)."),
    ] = None,
    scheduler: Annotated[
        Optional[Scheduler], typer.Option(rich_help_panel="Sampler", help="Sampler (default: the bundle's, else ddim).")
    ] = None,
    karras_sigmas: Annotated[
        Optional[bool], typer.Option(rich_help_panel="Sampler", help="Karras sigmas (default: the bundle's, else off).")
    ] = None,
    sampler: StoredSamplerOption = None,
    batch_size: Annotated[int, typer.Option(rich_help_panel="Backend", min=1, help="Samples per network call.")] = 64,
    threads: Annotated[
        Optional[int],
        typer.Option(rich_help_panel="Backend", min=1, help="onnxruntime intra-op threads (default: all cores)."),
    ] = None,
    backend: BackendOption = RuntimeBackend.onnxruntime,
    provider: ProviderOption = Provider.cpu,
    device: DeviceOption = "CPU",
    engine: EngineOption = None,
    corrections: CorrectionsOption = True,
    conditioning: Annotated[
        Optional[Path],
        typer.Option(
            rich_help_panel="Conditioning",
            help="Conditional models: prompts' conditioning (.safetensors from `stepquant encode-prompts`); sample i "
            "takes row i mod P.",
        ),
    ] = None,
    classes: Classes = None,
    guidance_scale: Annotated[
        Optional[float],
        typer.Option(
            rich_help_panel="Sampler",
            help="Classifier-free guidance scale (default: the bundle's calibration scale, else 1).",
        ),
    ] = None,
    decode_with: Annotated[
        Optional[Path],
        typer.Option(
            rich_help_panel="Output",
            help="Latent models: decode the latents with this pipeline directory's VAE before writing.",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(rich_help_panel="Output", help="Show progress bars.")] = True,
    trust_key: TrustKey = None,
) -> None:
    """Sample from a bundle or from an FP model with per-sample seeds, so outputs compare one to one."""
    if (bundle is None) == (model is None):
        raise typer.BadParameter("give exactly one of --bundle and --model")
    if model is not None and backend != RuntimeBackend.onnxruntime:
        raise typer.BadParameter("--model runs the FP model in torch; --backend applies to --bundle")
    if seed + n - 1 > MAX_SEED:
        raise typer.BadParameter(f"seed + n - 1 must stay at most {MAX_SEED}", param_hint="--seed")
    _check_out(out, n)
    requested = {
        **sampler_request(
            sampler, scheduler=scheduler and scheduler.value, steps=steps, eta=eta, karras_sigmas=karras_sigmas
        ),
        "guidance_scale": guidance_scale,
    }
    if bundle is not None:
        loaded = load_bundle(bundle, trust_key)
        config = bundle_sampler(loaded, **requested)
        table = bundle_table(loaded, config)
        table.check_sampler(
            config.scheduler, config.steps, config.eta, config.karras_sigmas
        )  # before any graph is loaded
        manifest = loaded.manifest
        shape, latent = manifest.sample_shape, manifest.sample_space == "latent"
        rows = choose_conditioning(
            manifest.conditions,
            f"bundle {bundle}",
            conditioning,
            parse_classes(classes),
            loaded.file(manifest.class_table) if manifest.class_table else None,
        )
        runner = quantized_backend(loaded, threads, backend.value, engine, provider=provider.value, device=device)
        terms = bundle_corrections(loaded, config) if corrections else None
    else:  # the FP model in torch: the export side
        from stepquant.models import EpsilonModel, load_model
        from stepquant.models.conditioning import load_conditioning
        from stepquant.models.denoisers import sample_shape
        from stepquant.models.schedulers import capture_table
        from stepquant.models.torch_backend import TorchBackend

        fp = load_model(model)
        config = SamplerConfig().overridden(**requested)
        runner, terms = TorchBackend(EpsilonModel(fp.denoiser)), None
        table = capture_table(config, fp.scheduler_config)
        shape, latent = sample_shape(fp.denoiser), fp.latent
        rows = load_conditioning(runner.model, fp, None, conditioning, shape, parse_classes(classes))
    _check_out(out, n, shape)
    if decode_with and not latent:
        raise typer.BadParameter(
            "this model samples pixels, not latents: drop --decode-with", param_hint="--decode-with"
        )
    batches = sample_batches(
        runner,
        table,
        range(seed, seed + n),
        shape,
        config,
        batch_size,
        progress=progress,
        corrections=terms,
        conditioning=rows,
        clip=not latent,
    )
    if decode_with:
        from stepquant.models.vae import decode_latents  # the pipeline's VAE, in torch: the export side

        batches = (np.asarray(decode_latents(decode_with, latents)) for latents in batches)
    if out.suffix == ".png":
        from stepquant.eval.images import save_grid

        samples = np.concatenate(list(batches))
        write_atomically(out, lambda path: save_grid(samples, path))
    else:
        first = next(batches)  # decoded images have the VAE's shape, not the latents'
        write_npz_batches(out, "samples", (n, *first.shape[1:]), itertools.chain([first], batches))
    guided = f", guidance {config.guidance_scale:g}" if rows is not None else ""
    kind = "images" if decode_with else "latents" if latent else "samples"
    print(f"wrote {n} {kind} ({config.describe()}{guided}) to {out}")
