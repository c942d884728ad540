"""Calibration inputs on disk, one safetensors file per recorded network call, so an export's memory does not
grow with `--calib-samples` (SDXL: 64 trajectories x 25 steps x 2 halves of 77 x 2048 text states are 2 GB).
The calibration set reads them back one call at a time; only the timesteps stay in memory."""

from __future__ import annotations

import errno
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stepquant.errors import StepquantError

SAMPLE, TIMESTEP, CONDITION = "sample", "timestep", "condition."


class ShardError(StepquantError, OSError):
    """A calibration shard could not be written (the disk is full) or read back."""


class CallShards:
    """An append-only directory of recorded calls: `append` one call's inputs, `load(i)` them back."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.names: list[str] = []  # the condition inputs in the model's order (files keep no order)

    def __len__(self) -> int:
        return self.count

    def _path(self, index: int) -> Path:
        return self.directory / f"call_{index:06d}.safetensors"

    def append(self, sample: torch.Tensor, timestep: torch.Tensor, conditions: dict[str, torch.Tensor]) -> None:
        tensors = {SAMPLE: sample.contiguous(), TIMESTEP: timestep.contiguous(),
                   **{CONDITION + name: value.contiguous() for name, value in conditions.items()}}
        self.names = list(conditions)
        path = self._path(self.count)
        try:
            save_file(tensors, str(path))
        except OSError as err:
            path.unlink(missing_ok=True)
            what = "the disk is full" if err.errno == errno.ENOSPC else err.strerror or str(err)
            raise ShardError(f"cannot write calibration inputs to {self.directory}: {what}") from err
        self.count += 1

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(samples, timesteps, conditions) of call `index`."""
        try:
            tensors = load_file(str(self._path(index)))
        except (OSError, ValueError) as err:
            raise ShardError(f"cannot read calibration shard {self._path(index)}: {err}") from err
        return tensors[SAMPLE], tensors[TIMESTEP], {name: tensors[CONDITION + name] for name in self.names}
