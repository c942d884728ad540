"""Permissions of the files stepquant writes: what an ordinary open or mkdir gives under the process's umask,
even where a library (tempfile, safetensors, onnx) creates its files private."""

from __future__ import annotations

import os
from pathlib import Path


def with_umask(path: Path, mode: int) -> None:
    """Give `path` the permissions `mode` gets under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    Path(path).chmod(mode & ~umask)


def ordinary_modes(directory: Path) -> None:
    """Give every file and folder under `directory` (not following links) an ordinary file's or folder's mode;
    a file with an execute bit (a build script) keeps being executable."""
    for folder, folders, names in os.walk(directory):
        for name in folders:
            with_umask(Path(folder) / name, 0o777)
        for name in names:
            path = Path(folder) / name
            if not path.is_symlink():
                with_umask(path, 0o777 if path.stat().st_mode & 0o111 else 0o666)
