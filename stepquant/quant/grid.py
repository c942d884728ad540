"""The symmetric integer grid TensorRT uses: zero point 0, scale = amax / qmax.

Weights use the narrow range [-(2^(b-1)-1), 2^(b-1)-1] (INT8: [-127, 127]) so the grid is symmetric;
activations use the full range [-2^(b-1), 2^(b-1)-1] (INT8: [-128, 127]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IntGrid:
    """A signed integer grid of `bits` bits, optionally without its most negative value."""

    bits: int
    narrow: bool

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bit width must be between 2 and 8, got {self.bits}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -self.qmax if self.narrow else -(2 ** (self.bits - 1))

    def scale_for(self, amax: torch.Tensor) -> torch.Tensor:
        """Scale mapping `amax` to `qmax`; a zero range is refused rather than silently patched."""
        if not torch.isfinite(amax).all():
            raise ValueError("range is not finite (NaN or inf in the calibrated amax)")
        if (amax <= 0).any():
            raise ValueError("range is zero: the tensor was all zeros on the calibration data")
        return amax / self.qmax

    def to_int(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Round half to even (as ONNX QuantizeLinear does) and saturate to the grid."""
        return torch.clamp(torch.round(x / scale), self.qmin, self.qmax)
