"""Command outputs written whole or not at all: to a temporary file beside the destination, renamed at the
end; and arrays streamed into an .npz batch by batch, so memory is bounded by a batch, not the whole output."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from stepquant.file_modes import with_umask


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a temporary path in `out`'s directory (same suffix), then rename it to `out`, so an
    error leaves no partial file behind."""
    if not out.parent.is_dir():
        raise ValueError(f"cannot write {out}: {out.parent} is not an existing directory")
    handle, temporary = tempfile.mkstemp(suffix=out.suffix, dir=out.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        with_umask(Path(temporary), 0o666)  # mkstemp makes it private; an output is an ordinary file
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def check_writable(out: Path, suffixes: tuple[str, ...], size_bytes: int) -> None:
    """Refuse, before any work, an output of another type, in a directory that does not exist, or larger than
    the free space there."""
    if out.suffix not in suffixes:
        raise ValueError(f"--out must end in {' or '.join(suffixes)}, got {out.name}")
    if not out.parent.is_dir():
        raise ValueError(f"cannot write {out}: {out.parent} is not an existing directory")
    if out.is_dir():
        raise ValueError(f"cannot write {out}: it is a directory")
    free = shutil.disk_usage(out.parent).free
    if size_bytes > free:
        raise ValueError(
            f"cannot write {out}: it would take {_amount(size_bytes)} and the directory has {_amount(free)} free"
        )


def _amount(size_bytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if size_bytes >= size:
            return f"{size_bytes / size:.1f} {unit}"
    return f"{size_bytes:,} bytes"


def write_npz_batches(out: Path, name: str, shape: tuple[int, ...], batches: Iterable[np.ndarray]) -> None:
    """Write an .npz holding one float32 array `name` of `shape`, from `batches` along its first axis, without
    holding the whole array (`np.load(out)[name]` reads it back)."""

    def write(path: Path) -> None:
        rows = 0
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(
                    member,
                    {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                        "fortran_order": False,
                        "shape": tuple(shape),
                    },
                )
                for batch in batches:
                    member.write(np.ascontiguousarray(batch, dtype=np.float32).tobytes())
                    rows += len(batch)
        if rows != shape[0]:
            raise RuntimeError(f"{rows} rows were written where {shape[0]} were announced")

    write_atomically(out, write)
