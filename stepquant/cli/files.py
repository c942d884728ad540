"""Command outputs written whole or not at all: to a temporary file beside the destination, renamed at the end."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a temporary path in `out`'s directory (same suffix), then rename it to `out`, so an
    error leaves no partial file behind."""
    if not out.parent.is_dir():
        raise ValueError(f"cannot write {out}: {out.parent} is not an existing directory")
    handle, temporary = tempfile.mkstemp(suffix=out.suffix, dir=out.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
