"""Options several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

TrustKey = Annotated[Optional[Path], typer.Option(
    help="Refuse the bundle unless its manifest is signed by this Ed25519 public key (from `stepquant keygen`).")]
SignKey = Annotated[Optional[Path], typer.Option(
    help="Sign the bundle's manifest with this Ed25519 private key (from `stepquant keygen`).")]
