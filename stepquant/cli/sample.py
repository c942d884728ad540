"""`stepquant sample`: seeded samples from a bundle or an FP model, as a PNG grid or raw .npz."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

from stepquant.cli.choices import RuntimeBackend, Scheduler
from stepquant.cli.files import check_writable, write_atomically, write_npz_batches
from stepquant.cli.options import TrustKey
from stepquant.eval import save_grid
from stepquant.export import load_bundle
from stepquant.models import EpsilonModel, load_model
from stepquant.models.denoisers import sample_shape
from stepquant.models.vae import decode_latents
from stepquant.runtime import SamplerConfig, TorchBackend
from stepquant.runtime.bundle_backends import bundle_corrections, quantized_backend
from stepquant.runtime.guidance import Conditioning, ConditioningError
from stepquant.runtime.sampler import sample_batches
from stepquant.runtime.seeding import MAX_SEED

MAX_GRID_SAMPLES = 4096  # a PNG grid is built in memory whole; more samples go to an .npz


def _check_out(out: Path, n: int, shape: tuple[int, ...] | None = None) -> None:
    """Refuse an output that cannot be written before any work (it would be thrown away): its type and
    directory at once, its size once the sample `shape` is known."""
    check_writable(out, (".png", ".npz"), n * int(np.prod(shape)) * 4 if shape and out.suffix == ".npz" else 0)
    if out.suffix == ".png" and n > MAX_GRID_SAMPLES:
        raise ValueError(f"a PNG grid holds at most {MAX_GRID_SAMPLES} samples, got --n {n}: write an .npz for more")


def sample_command(
    out: Annotated[Path, typer.Option(help="Output: .png grid or .npz with key 'samples' (N,C,H,W; in [-1, 1], or latents).")],
    bundle: Annotated[Optional[Path], typer.Option(help="Bundle to run (onnxruntime).")] = None,
    model: Annotated[Optional[str], typer.Option(help="FP model to run (torch), seeded exactly as a bundle.")] = None,
    n: Annotated[int, typer.Option(min=1, help="Number of samples (seeds seed .. seed+n-1).")] = 64,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED, help="First seed.")] = 0,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Sampler steps (default: the bundle's, else 25).")] = None,
    eta: Annotated[float, typer.Option(help="DDIM eta (0: deterministic).")] = 0.0,
    scheduler: Annotated[Scheduler, typer.Option(help="Sampler.")] = Scheduler.ddim,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per network call.")] = 64,
    threads: Annotated[Optional[int], typer.Option(min=1, help="onnxruntime intra-op threads (default: all cores).")] = None,
    backend: Annotated[RuntimeBackend, typer.Option(help="What runs a bundle's graph.")] = RuntimeBackend.onnxruntime,
    engine: Annotated[Optional[Path], typer.Option(help="TensorRT engine for --backend tensorrt (default: the bundle's).")] = None,
    corrections: Annotated[bool, typer.Option(help="Apply the bundle's per-timestep correction terms, if it has them.")] = True,
    conditioning: Annotated[Optional[Path], typer.Option(
        help="Conditional models: prompts' conditioning (.safetensors from `stepquant encode-prompts`); sample i takes row i mod P.")] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(
        help="Classifier-free guidance scale (default: the bundle's calibration scale, else 1).")] = None,
    decode_with: Annotated[Optional[Path], typer.Option(
        help="Latent models: decode the latents with this pipeline directory's VAE before writing.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
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
    if bundle is not None:
        loaded = load_bundle(bundle, trust_key)
        runner = quantized_backend(loaded, threads, backend.value, engine)
        terms = bundle_corrections(loaded) if corrections else None
        noise_schedule, shape = loaded.manifest["noise_schedule"], loaded.sample_shape
        default_steps, default_guidance = loaded.manifest["sampler"]["steps"], loaded.manifest["sampler"]["guidance_scale"]
        inputs = loaded.conditions
    else:
        fp = load_model(model)
        runner, noise_schedule, terms = TorchBackend(EpsilonModel(fp.denoiser)), fp.scheduler_config, None
        shape, default_steps, default_guidance = sample_shape(fp.denoiser), 25, 1.0
        inputs = runner.model.conditions
    _check_out(out, n, shape)
    names = [c.name for c in inputs]
    rows = Conditioning.load(conditioning).for_inputs(inputs) if conditioning else None
    if names and rows is None:
        raise ConditioningError(f"this model is conditioned on {', '.join(names)}: pass --conditioning")
    config = SamplerConfig(scheduler.value, steps or default_steps, eta,
                           default_guidance if guidance_scale is None else guidance_scale)
    batches = sample_batches(runner, noise_schedule, range(seed, seed + n), shape, config, batch_size, progress=progress,
                             corrections=terms, conditioning=rows, clip=not names)
    if decode_with:
        batches = (decode_latents(decode_with, latents) for latents in batches)
    if out.suffix == ".png":
        samples = torch.cat(list(batches))
        write_atomically(out, lambda path: save_grid(samples, path))
    else:
        first = next(batches)  # decoded images have the VAE's shape, not the latents'
        write_npz_batches(out, "samples", (n, *first.shape[1:]),
                          (batch.numpy() for batch in itertools.chain([first], batches)))
    guided = f", guidance {config.guidance_scale:g}" if names else ""
    kind = "images" if decode_with else "latents" if names else "samples"
    print(f"wrote {n} {kind} ({config.steps} {config.scheduler.upper()} steps, "
          f"eta {config.eta:g}{guided}) to {out}")
