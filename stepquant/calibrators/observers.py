"""Range observers: a histogram of |x| pooled over every calibration timestep, from which the
activation range is taken by max, percentile or MSE search (one scale per tensor)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from stepquant.quant.grid import Grid


class RangeObserver:
    """Streams |x| into `bins` equal bins whose width doubles whenever a larger value arrives, so
    memory is constant in the amount of calibration data and the exact maximum is kept."""

    def __init__(self, name: str, bins: int = 2048, span: float = 0.0) -> None:
        """`span`, when known beforehand (the maximum over every rank), fixes the grid at span / bins, so the
        histograms of several processes add up bin by bin."""
        self.name = name
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.width = span / bins
        self.max = span

    def update(self, x: torch.Tensor) -> None:
        values = x.detach().abs().flatten().float()
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"non-finite values (NaN or inf) at the input of {self.name} during calibration")
        batch_max = float(values.max()) if values.numel() else 0.0
        self.max = max(self.max, batch_max)
        if self.width == 0.0:
            if batch_max == 0.0:
                self.counts[0] += values.numel()
                return
            self.width = batch_max / self.bins
        while self.max > self.width * self.bins:
            self.counts = torch.cat(
                [self.counts.view(-1, 2).sum(dim=1), torch.zeros(self.bins // 2, dtype=torch.float64)]
            )
            self.width *= 2.0
        self.counts += torch.histc(values, bins=self.bins, min=0.0, max=self.width * self.bins).double().cpu()

    def _centers(self) -> torch.Tensor:
        return (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width

    def amax(self, method: str, grid: Grid, percentile: float = 99.99) -> float:
        """The calibrated range by `method` (a key of OBSERVERS); 0.0 means the tensor was all zeros (the
        caller refuses it)."""
        if method not in OBSERVERS:
            raise ValueError(f"unknown observer method {method!r}; choose from {', '.join(OBSERVERS)}")
        return self.max if self.max == 0.0 else OBSERVERS[method](self, grid, percentile)

    def percentile_amax(self, percentile: float) -> float:
        """The smallest bin edge below which `percentile` percent of the values fall."""
        cumulative = torch.cumsum(self.counts, 0) / self.counts.sum()
        index = int(torch.searchsorted(cumulative, torch.tensor(percentile / 100.0, dtype=torch.float64)))
        return min(self.max, (index + 1) * self.width)

    def mse_amax(self, grid: Grid, candidates: int = 80) -> float:
        """Q-Diffusion's search: shrink the max by 1% steps, keep the range of least squared error."""
        centers = self._centers()
        best, best_error = self.max, math.inf
        for i in range(candidates):
            amax = self.max * (1.0 - 0.01 * i)
            scale = torch.tensor(amax / grid.qmax, dtype=torch.float64)
            error = centers - grid.quantize(centers, scale) * scale
            total = float((self.counts * error.square()).sum())
            if total < best_error:
                best, best_error = amax, total
        return best


# --calibrator's observers: name -> (observer, grid, percentile) -> range
OBSERVERS: dict[str, Callable[[RangeObserver, Grid, float], float]] = {
    "max": lambda observer, grid, percentile: observer.max,
    "percentile": lambda observer, grid, percentile: observer.percentile_amax(percentile),
    "mse": lambda observer, grid, percentile: observer.mse_amax(grid),
}
OBSERVER_METHODS = tuple(OBSERVERS)
