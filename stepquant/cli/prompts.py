"""`stepquant encode-prompts`: prompts to a conditioning file with a pipeline's own text encoder(s)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from stepquant.models import EpsilonModel, load_model
from stepquant.models.conditioning import encode_prompts, read_prompts
from stepquant.models.denoisers import sample_shape


def encode_prompts_command(
    model: Annotated[str, typer.Option(help="A diffusers pipeline directory or hub id with its text encoder(s).")],
    prompts_file: Annotated[Path, typer.Option(help="Prompts, one per line.")],
    out: Annotated[Path, typer.Option(help="Conditioning file to write (.safetensors).")],
) -> None:
    """Encode prompts (and the empty prompt, for guidance) into the conditioning `sample` and `export` read."""
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out.name}")
    loaded = load_model(model)
    denoiser = EpsilonModel(loaded.denoiser)
    if not denoiser.conditions:
        raise ValueError(f"{type(loaded.denoiser).__name__} is unconditional: it takes no prompts")
    if loaded.pipeline is None:
        raise ValueError(f"{model} is a bare model directory: encoding prompts needs the whole pipeline")
    conditioning = encode_prompts(loaded.pipeline, read_prompts(prompts_file), denoiser.conditions, sample_shape(loaded.denoiser))
    handle, temporary = tempfile.mkstemp(suffix=".safetensors", dir=out.parent if out.parent.is_dir() else None)
    os.close(handle)
    try:
        conditioning.save(temporary)
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    print(f"wrote the conditioning of {len(conditioning)} prompts ({', '.join(conditioning.cond)}) to {out}")
