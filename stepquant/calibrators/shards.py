"""Calibration data on disk, so an export's memory does not grow with `--calib-samples` (SDXL: 64 trajectories
x 25 steps x 2 halves of 77 x 2048 text states are 2 GB): `RowShards` is an append-only directory of
safetensors files holding the same named tensors, rows along their first axis, from which any rows are read
back without reading the rest. The calibration set keeps one file per recorded network call (`CallShards`);
reconstruction keeps a block's inputs and targets the same way.

Files are written by safetensors and read with positioned reads (`os.preadv`) at the offsets their header
gives, not through safetensors' memory map: every page of a map that a read touches counts in the process's
resident memory until the map is closed, so random batches drawn over a block's inputs brought the whole
block into RSS, and peak RSS grew with `--calib-samples` again (measured: +21% from 16 to 64 samples). Read
pages stay in the kernel's page cache, which is not the process's."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from stepquant.errors import StepquantError

SAMPLE, TIMESTEP, CONDITION = "sample", "timestep", "condition."


class ShardError(StepquantError, OSError):
    """A calibration shard could not be written (the disk is full) or read back."""


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class ShardFile:
    """One safetensors file's tensors, read a range of rows at a time by positioned reads (no memory map).
    The header is parsed once; each read opens the file for itself, so thousands of shards hold no descriptors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as file:
                (size,) = struct.unpack("<Q", file.read(8))
                if size > os.fstat(file.fileno()).st_size - 8:
                    raise ValueError(f"its header claims {size} bytes, more than the file holds")
                header = json.loads(file.read(size))
            header.pop("__metadata__", None)
            self.tensors = {
                name: (_DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + size + entry["data_offsets"][0])
                for name, entry in header.items()
            }
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            raise ShardError(f"cannot read calibration shard {path}: {err}") from err

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (all of it by default)."""
        dtype, shape, offset = self.tensors[name]
        stop = (shape[0] if shape else 1) if stop is None else stop
        row = math.prod(shape[1:]) * dtype.itemsize
        buffer = bytearray((stop - start) * row)
        view, position = memoryview(buffer), offset + start * row
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                while view:  # a read returns at most about 2 GiB on Linux: loop
                    got = os.preadv(fd, [view], position)
                    if got == 0:
                        raise ShardError(f"calibration shard {self.path} is truncated ({name})")
                    view, position = view[got:], position + got
            finally:
                os.close(fd)
        except OSError as err:
            raise ShardError(f"cannot read calibration shard {self.path}: {err.strerror or err}") from err
        values = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        return values.reshape((stop - start, *shape[1:]) if shape else ())


class RowShards:
    """Files `<prefix>_000000.safetensors`, ... in `directory`, each a dict of tensors with the same names and
    the same number of rows; `append` one, `load` one whole, `rows` gathers rows from all of them."""

    def __init__(self, directory: Path, prefix: str = "rows") -> None:
        self.directory, self.prefix = Path(directory), prefix
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sizes: list[int] = []
        self._files: dict[int, ShardFile] = {}

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def rows_total(self) -> int:
        return sum(self.sizes)

    def _path(self, index: int) -> Path:
        return self.directory / f"{self.prefix}_{index:06d}.safetensors"

    def append(self, tensors: dict[str, torch.Tensor]) -> None:
        path = self._path(len(self.sizes))
        try:
            save_file({name: value.detach().cpu().contiguous() for name, value in tensors.items()}, str(path))
        except OSError as err:
            path.unlink(missing_ok=True)
            what = "the disk is full" if err.errno == errno.ENOSPC else err.strerror or str(err)
            raise ShardError(f"cannot write calibration inputs to {self.directory}: {what}") from err
        self.sizes.append(int(next(iter(tensors.values())).shape[0]))

    def _file(self, index: int) -> ShardFile:
        if index not in self._files:
            self._files[index] = ShardFile(self._path(index))
        return self._files[index]

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """Every tensor of file `index`."""
        file = self._file(index)
        return {name: file.read(name) for name in file.keys()}

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows `index` (over all files in order; repeats allowed) of every tensor, in the order asked for;
        each file is read in runs of consecutive rows, so a random batch reads only its own rows."""
        if len(index) == 0:
            file = self._file(0)
            return {name: file.read(name, 0, 0) for name in file.keys()}
        sizes = torch.tensor(self.sizes)
        ends = sizes.cumsum(0)
        files = torch.bucketize(index, ends, right=True)
        local = index - (ends - sizes)[files]
        position = torch.empty(len(index), dtype=torch.long)
        pieces: dict[str, list[torch.Tensor]] = {}
        base = 0
        for f in files.unique().tolist():
            mask = files == f
            wanted, inverse = local[mask].unique(sorted=True, return_inverse=True)
            position[mask] = base + inverse
            base += len(wanted)
            breaks = (torch.nonzero(wanted.diff() != 1).flatten() + 1).tolist()
            runs = [(int(run[0]), int(run[-1]) + 1) for run in torch.tensor_split(wanted, breaks)]
            file = self._file(f)
            for name in file.keys():
                pieces.setdefault(name, []).extend(file.read(name, lo, hi) for lo, hi in runs)
        return {name: torch.cat(parts)[position] for name, parts in pieces.items()}

    def remove(self) -> None:
        """Delete the files (and the directory)."""
        self._files.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


class CallShards(RowShards):
    """The calibration set's recorded calls, one file each: `append` a call's inputs, `load(i)` them back."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, prefix="call")
        self.names: list[str] = []  # the condition inputs in the model's order (files keep no order)

    def append(self, sample: torch.Tensor, timestep: torch.Tensor, conditions: dict[str, torch.Tensor]) -> None:
        self.names = list(conditions)
        super().append(
            {SAMPLE: sample, TIMESTEP: timestep, **{CONDITION + name: value for name, value in conditions.items()}}
        )

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(samples, timesteps, conditions) of call `index`."""
        return self.split(super().load(index))

    def split(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return tensors[SAMPLE], tensors[TIMESTEP], {name: tensors[CONDITION + name] for name in self.names}
