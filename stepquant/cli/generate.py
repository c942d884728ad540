"""`stepquant generate`: prompts to PNGs from a whole-pipeline bundle, on the runtime alone (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from stepquant.bundle import load_bundle
from stepquant.cli.choices import Provider, RuntimeBackend, Scheduler, choices
from stepquant.cli.files import check_writable, write_atomically
from stepquant.cli.options import (
    BackendOption,
    CorrectionsOption,
    DeviceOption,
    EngineOption,
    ProviderOption,
    StoredSamplerOption,
    TrustKey,
    sampler_request,
)
from stepquant.runtime.bundle_backends import bundle_sampler
from stepquant.runtime.guidance import read_prompts
from stepquant.runtime.seeding import MAX_SEED
from stepquant.runtime.text_to_image import GRAPHS, GenerateRequest, generate_batches, require_text_to_image, to_uint8

Graph = choices("Graph", GRAPHS)
MAX_GRID_IMAGES = 1024


def _prompts(prompt: list[str] | None, prompts_file: Path | None) -> tuple[str, ...]:
    if prompt and prompts_file:
        raise typer.BadParameter("give --prompt or --prompts-file, not both", param_hint="--prompt")
    if prompts_file is not None:
        prompt = read_prompts(prompts_file)
    if not prompt:
        raise typer.BadParameter("no prompt given: pass --prompt (repeatable) or --prompts-file", param_hint="--prompt")
    return tuple(prompt)


def _check_out(out: Path, count: int, image_bytes: int) -> None:
    """A .png path is one grid; any other path a folder (new, or empty) for one PNG per image."""
    if out.suffix == ".png":
        if count > MAX_GRID_IMAGES:
            raise typer.BadParameter(
                f"a PNG grid holds at most {MAX_GRID_IMAGES} images, got {count}: give a folder", param_hint="--out"
            )
        check_writable(out, (".png",), count * image_bytes)
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise typer.BadParameter(
            f"{out} exists and is not an empty folder (images are never written over)", param_hint="--out"
        )
    check_writable(out.parent / f"{out.name}.png", (".png",), count * image_bytes)  # its directory and free space


def generate_command(
    bundle: Annotated[
        Path,
        typer.Option(
            rich_help_panel="Input", help="Whole-pipeline bundle (tokenizer, text encoder, denoiser, VAE decoder)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            rich_help_panel="Output", help="A .png path: one grid; any other path: a folder of image-NNNN.png."
        ),
    ],
    prompt: Annotated[
        Optional[list[str]], typer.Option(rich_help_panel="Prompts", help="A prompt (repeatable).")
    ] = None,
    prompts_file: Annotated[
        Optional[Path], typer.Option(rich_help_panel="Prompts", help="Prompts, one per line (instead of --prompt).")
    ] = None,
    negative_prompt: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Prompts",
            help="What guidance steers away from (default: the pipeline's: the empty prompt, or SDXL's zero "
            "embeddings).",
        ),
    ] = None,
    guidance_scale: Annotated[
        Optional[float],
        typer.Option(rich_help_panel="Sampler", help="Classifier-free guidance scale (default: the bundle's)."),
    ] = None,
    n: Annotated[
        int,
        typer.Option(
            rich_help_panel="Sampler", min=1, help="Images per prompt (seeds seed, seed+1, ... prompt by prompt)."
        ),
    ] = 1,
    seed: Annotated[int, typer.Option(rich_help_panel="Sampler", min=0, max=MAX_SEED, help="First seed.")] = 0,
    steps: Annotated[
        Optional[int], typer.Option(rich_help_panel="Sampler", min=1, help="Sampler steps (default: the bundle's).")
    ] = None,
    scheduler: Annotated[
        Optional[Scheduler], typer.Option(rich_help_panel="Sampler", help="Sampler (default: the bundle's).")
    ] = None,
    sampler: StoredSamplerOption = None,
    graph: Annotated[
        Graph,
        typer.Option(
            rich_help_panel="Sampler", help="Denoise with the quantized graph, or the FP32 reference graph (an A/B)."
        ),
    ] = "quantized",
    backend: BackendOption = RuntimeBackend.onnxruntime,
    provider: ProviderOption = Provider.cpu,
    device: DeviceOption = "CPU",
    engine: EngineOption = None,
    batch_size: Annotated[int, typer.Option(rich_help_panel="Backend", min=1, help="Images per network call.")] = 8,
    threads: Annotated[
        Optional[int],
        typer.Option(rich_help_panel="Backend", min=1, help="onnxruntime intra-op threads (default: all cores)."),
    ] = None,
    corrections: CorrectionsOption = True,
    progress: Annotated[bool, typer.Option(rich_help_panel="Output", help="Show progress bars.")] = True,
    trust_key: TrustKey = None,
) -> None:
    """Turn prompts into images with a whole-pipeline bundle: tokenizer, text encoder, guided denoising loop and
    VAE decoder, on numpy and onnxruntime (or TensorRT for the denoiser)."""
    prompts = _prompts(prompt, prompts_file)
    request = GenerateRequest(prompts, negative_prompt, n, seed, getattr(graph, "value", graph), batch_size)
    if seed + request.count - 1 > MAX_SEED:
        raise typer.BadParameter(f"seed + images - 1 must stay at most {MAX_SEED}", param_hint="--seed")
    loaded = load_bundle(bundle, trust_key)
    require_text_to_image(loaded)
    config = bundle_sampler(
        loaded,
        **sampler_request(sampler, scheduler=scheduler and scheduler.value, steps=steps),
        guidance_scale=guidance_scale,
    )
    channels, height, width = loaded.manifest.sample_shape
    _check_out(out, request.count, 3 * height * width * 64)  # decoded images: up to 8x8 pixels per latent, RGB bytes
    images = np.concatenate(
        list(
            generate_batches(
                loaded,
                request,
                config,
                threads,
                backend.value,
                engine,
                corrections,
                progress,
                provider=provider.value,
                device=device,
            )
        )
    )
    _write(out, images)
    print(
        f"wrote {len(images)} image{'s' if len(images) != 1 else ''} ({config.describe()}, guidance "
        f"{config.guidance_scale:g}, {request.graph} denoiser) "
        f"to {out}"
    )


def _write(out: Path, images: np.ndarray) -> None:
    """Images in [-1, 1]: one grid, or a folder of PNGs made whole beside `out` and renamed into place."""
    import shutil
    import tempfile

    from PIL import Image

    from stepquant.file_modes import ordinary_modes, with_umask

    if out.suffix == ".png":
        from stepquant.eval.images import save_grid

        width = images.shape[-1]
        write_atomically(
            out, lambda path: save_grid(images, path, columns=min(8, len(images)), upscale=max(1, 128 // width))
        )
        return
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name[:64]}.", suffix=".partial", dir=out.parent))
    try:
        for index, image in enumerate(to_uint8(images)):
            Image.fromarray(image).save(staging / f"image-{index:04d}.png", format="PNG")
        ordinary_modes(staging)
        with_umask(staging, 0o777)
        if out.is_dir():
            out.rmdir()  # empty, checked before any work
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
