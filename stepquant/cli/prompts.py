"""`stepquant encode-prompts`: prompts to a conditioning file with a pipeline's own text encoder(s)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepquant.cli.files import write_atomically
from stepquant.models import EpsilonModel, load_model
from stepquant.models.conditioning import load_conditioning
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
    # the same encoding as `export --prompts-file`, refused the same way for unconditional models and bare directories
    conditioning = load_conditioning(
        EpsilonModel(loaded.denoiser), loaded, prompts_file, None, sample_shape(loaded.denoiser)
    )
    write_atomically(out, conditioning.save)
    print(f"wrote the conditioning of {len(conditioning)} prompts ({', '.join(conditioning.cond)}) to {out}")
