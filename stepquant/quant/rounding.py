"""AdaRound's learned rounding: each weight rounds down or up, decided by a learned alpha instead of
round-to-nearest. h(alpha) = clip(sigmoid(alpha)(zeta - gamma) + gamma, 0, 1) relaxes the choice while
training; the regulariser 1 - |2h - 1|^beta, with beta annealed, drives every h to 0 or 1."""

from __future__ import annotations

import torch
from torch import nn

from stepquant.quant.grid import IntGrid

ZETA, GAMMA = 1.1, -0.1


class LearnedRounding(nn.Module):
    """Grid values floor(w/s) + h for one weight tensor, initialised so that h equals the fractional
    part (the soft weight starts equal to the float weight). Always within one grid step of round-to-nearest."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, grid: IntGrid) -> None:
        super().__init__()
        if not isinstance(grid, IntGrid):
            raise ValueError(f"learned rounding needs an integer grid, got {grid}")
        self.grid = grid
        scaled = weight.detach() / scale
        self.register_buffer("floor", torch.floor(scaled))
        rest = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def values(self) -> torch.Tensor:
        """Grid values: relaxed while `soft`, else rounded up exactly where alpha >= 0 (h >= 0.5)."""
        up = self.h() if self.soft else (self.alpha >= 0).to(self.floor.dtype)
        return torch.clamp(self.floor + up, self.grid.qmin, self.grid.qmax)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()
