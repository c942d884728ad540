"""Runs a bundle exported with timestep groups: each step goes to the graph calibrated for its timestep."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
            raise ValueError(
                f"timestep {timestep:g} belongs to no timestep group of this bundle (its graphs cover "
                f"{sorted(self.group_of, reverse=True)}); sample with the steps it was exported for"
            ) from None

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditions: np.ndarray) -> np.ndarray:
        groups = np.array([self.group(t) for t in np.asarray(timestep).tolist()])
        if (groups == groups[0]).all():
            return self.backends[int(groups[0])](sample, timestep, **conditions)
        out = None
        for g in np.unique(groups).tolist():
            rows = groups == g
            part = self.backends[g](sample[rows], timestep[rows], **{k: v[rows] for k, v in conditions.items()})
            out = np.empty((len(sample), *part.shape[1:]), dtype=part.dtype) if out is None else out
            out[rows] = part
        return out
