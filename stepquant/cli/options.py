"""Options several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

TrustKey = Annotated[Optional[Path], typer.Option(
    help="Refuse the bundle unless its manifest is signed by this Ed25519 public key (from `stepquant keygen`).")]
SignKey = Annotated[Optional[Path], typer.Option(
    help="Sign the bundle's manifest with this Ed25519 private key (from `stepquant keygen`).")]
Classes = Annotated[Optional[str], typer.Option(
    help="Class-conditional models (demo-digits-cond): class indices, e.g. 0,1,7; sample i asks for classes[i mod len] "
         "(default: every class in turn).")]


def parse_classes(value: str | None) -> tuple[int, ...] | None:
    """'0,1,7' -> (0, 1, 7); one line naming what is not a class index."""
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",")]
    bad = next((part for part in parts if not (part.isascii() and part.isdigit())), None)
    if bad is not None:
        raise typer.BadParameter(f"{bad!r} is not a class index (non-negative integers, comma-separated)",
                                 param_hint="--classes")
    return tuple(int(part) for part in parts)
