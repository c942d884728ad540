"""Runs a bundle exported with timestep groups: each step goes to the graph calibrated for its timestep."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stepquant.runtime.backend import Backend


class TimestepGroupBackend:
    """One backend per timestep group behind the single-backend contract; a batch mixing timesteps is
    split by group and put back in order."""

    def __init__(self, backends: Sequence[Backend], timesteps: Sequence[Sequence[float]]) -> None:
        self.backends = list(backends)
        self.group_of = {float(t): g for g, group in enumerate(timesteps) for t in group}

    def group(self, timestep: float) -> int:
        try:
            return self.group_of[float(timestep)]
        except KeyError:
            raise ValueError(f"timestep {timestep:g} belongs to no timestep group of this bundle (its graphs cover "
                             f"{sorted(self.group_of, reverse=True)}); sample with the steps it was exported for") from None

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        groups = torch.tensor([self.group(t) for t in timestep.tolist()])
        if bool((groups == groups[0]).all()):
            return self.backends[int(groups[0])](sample, timestep, **conditions)
        out = None
        for g in groups.unique().tolist():
            rows = groups == g
            eps = self.backends[g](sample[rows], timestep[rows], **{k: v[rows] for k, v in conditions.items()})
            out = eps.new_empty((len(sample), *eps.shape[1:])) if out is None else out
            out[rows] = eps
        return out
