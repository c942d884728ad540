"""Calibration data on disk, so an export's memory does not grow with `--calib-samples` (SDXL: 64 trajectories
x 25 steps x 2 halves of 77 x 2048 text states are 2 GB): `RowShards` is an append-only directory of
safetensors files holding the same named tensors, rows along their first axis, from which any rows are read
back through safetensors' memory map without reading the rest. The calibration set keeps one file per
recorded network call (`CallShards`); reconstruction keeps a block's inputs and targets the same way."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stepquant.errors import StepquantError

SAMPLE, TIMESTEP, CONDITION = "sample", "timestep", "condition."


class ShardError(StepquantError, OSError):
    """A calibration shard could not be written (the disk is full) or read back."""


class RowShards:
    """Files `<prefix>_000000.safetensors`, ... in `directory`, each a dict of tensors with the same names and
    the same number of rows; `append` one, `load` one whole, `rows` gathers rows from all of them."""

    def __init__(self, directory: Path, prefix: str = "rows") -> None:
        self.directory, self.prefix = Path(directory), prefix
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sizes: list[int] = []
        self._open: dict[int, object] = {}

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

    def _file(self, index: int):
        if index not in self._open:
            try:
                self._open[index] = safe_open(str(self._path(index)), framework="pt")
            except (OSError, ValueError) as err:
                raise ShardError(f"cannot read calibration shard {self._path(index)}: {err}") from err
        return self._open[index]

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """Every tensor of file `index`."""
        file = self._file(index)
        return {name: file.get_tensor(name) for name in file.keys()}

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows `index` (over all files in order; repeats allowed) of every tensor, in the order asked for;
        each file is read in runs of consecutive rows, so a random batch reads only its own rows."""
        if len(index) == 0:
            file = self._file(0)
            return {name: file.get_slice(name)[0:0] for name in file.keys()}
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
                tensor = file.get_slice(name)
                pieces.setdefault(name, []).extend(tensor[lo:hi] for lo, hi in runs)
        return {name: torch.cat(parts)[position] for name, parts in pieces.items()}

    def remove(self) -> None:
        """Close and delete the files (and the directory)."""
        self._open.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


class CallShards(RowShards):
    """The calibration set's recorded calls, one file each: `append` a call's inputs, `load(i)` them back."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, prefix="call")
        self.names: list[str] = []  # the condition inputs in the model's order (files keep no order)

    def append(self, sample: torch.Tensor, timestep: torch.Tensor, conditions: dict[str, torch.Tensor]) -> None:
        self.names = list(conditions)
        super().append({SAMPLE: sample, TIMESTEP: timestep, **{CONDITION + name: value for name, value in conditions.items()}})

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(samples, timesteps, conditions) of call `index`."""
        return self.split(super().load(index))

    def split(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return tensors[SAMPLE], tensors[TIMESTEP], {name: tensors[CONDITION + name] for name in self.names}
