"""`stepquant sample`: seeded samples from a bundle or an FP model, as a PNG grid or raw .npz."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from stepquant.cli.choices import RuntimeBackend, Scheduler
from stepquant.cli.files import write_atomically
from stepquant.eval import save_grid
from stepquant.export import load_bundle
from stepquant.models import EpsilonModel, load_model
from stepquant.models.denoisers import sample_shape
from stepquant.models.vae import decode_latents
from stepquant.runtime import SamplerConfig, TorchBackend, sample
from stepquant.runtime.bundle_backends import bundle_corrections, quantized_backend
from stepquant.runtime.guidance import Conditioning, ConditioningError


def _write_samples(samples, out: Path) -> None:
    """Write a PNG grid or an .npz (key `samples`) via a temporary file, so no partial output remains."""
    if out.suffix not in (".png", ".npz"):
        raise ValueError(f"--out must end in .png (a grid) or .npz (raw samples), got {out.name}")
    if out.suffix == ".png":
        write_atomically(out, lambda path: save_grid(samples, path))
    else:
        write_atomically(out, lambda path: np.savez(path, samples=samples.numpy().astype(np.float32)))


def sample_command(
    out: Annotated[Path, typer.Option(help="Output: .png grid or .npz with key 'samples' (N,C,H,W; in [-1, 1], or latents).")],
    bundle: Annotated[Optional[Path], typer.Option(help="Bundle to run (onnxruntime).")] = None,
    model: Annotated[Optional[str], typer.Option(help="FP model to run (torch), seeded exactly as a bundle.")] = None,
    n: Annotated[int, typer.Option(help="Number of samples (seeds seed .. seed+n-1).")] = 64,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps (default: the bundle's, else 25).")] = None,
    eta: Annotated[float, typer.Option(help="DDIM eta (0: deterministic).")] = 0.0,
    scheduler: Annotated[Scheduler, typer.Option(help="Sampler.")] = Scheduler.ddim,
    batch_size: Annotated[int, typer.Option(help="Samples per network call.")] = 64,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads (default: all cores).")] = None,
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
) -> None:
    """Sample from a bundle or from an FP model with per-sample seeds, so outputs compare one to one."""
    if (bundle is None) == (model is None):
        raise typer.BadParameter("give exactly one of --bundle and --model")
    if model is not None and backend != RuntimeBackend.onnxruntime:
        raise typer.BadParameter("--model runs the FP model in torch; --backend applies to --bundle")
    if n < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--n")
    if bundle is not None:
        loaded = load_bundle(bundle)
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
    names = [c.name for c in inputs]
    rows = Conditioning.load(conditioning).for_inputs(inputs) if conditioning else None
    if names and rows is None:
        raise ConditioningError(f"this model is conditioned on {', '.join(names)}: pass --conditioning")
    config = SamplerConfig(scheduler.value, steps or default_steps, eta,
                           default_guidance if guidance_scale is None else guidance_scale)
    result = sample(runner, noise_schedule, range(seed, seed + n), shape, config, batch_size, progress=progress,
                    corrections=terms, conditioning=rows, clip=not names)
    samples = decode_latents(decode_with, result.samples) if decode_with else result.samples
    _write_samples(samples, out)
    guided = f", guidance {config.guidance_scale:g}" if names else ""
    kind = "images" if decode_with else "latents" if names else "samples"
    print(f"wrote {n} {kind} ({config.steps} {config.scheduler.upper()} steps, "
          f"eta {config.eta:g}{guided}) to {out}")
