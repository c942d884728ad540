"""The quantization grids TensorRT executes, all symmetric with zero point 0 and scale = amax / qmax.

- IntGrid: signed integers. Weights use the narrow range [-(2^(b-1)-1), 2^(b-1)-1] (INT8: [-127, 127])
  so the grid is symmetric; activations use the full range [-2^(b-1), 2^(b-1)-1] (INT8: [-128, 127]).
  Grids narrower than 8 bits are stored in INT8 containers. For onnxruntime's CPU kernels, which fuse
  U8 activations with S8 weights, the same grid can be stored as UINT8 with zero point 128: identical
  values (q_u8 = q_s8 + 128), only the container differs.
- Fp8Grid: FP8 E4M3 (saturating at +-448), for Ada/Hopper GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _checked_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    if not torch.isfinite(amax).all():
        raise ValueError("range is not finite (NaN or inf in the calibrated amax)")
    if (amax <= 0).any():
        raise ValueError("range is zero: the tensor was all zeros on the calibration data")
    return amax / qmax


@dataclass(frozen=True)
class IntGrid:
    """A signed integer grid of `bits` bits, optionally without its most negative value, stored as INT8
    (zero point 0) or, with `unsigned_storage`, as UINT8 with zero point 128."""

    bits: int
    narrow: bool
    unsigned_storage: bool = False

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.uint8 if self.unsigned_storage else torch.int8

    @property
    def zero_point(self) -> int:
        return 128 if self.unsigned_storage else 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bit width must be between 2 and 8, got {self.bits}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -self.qmax if self.narrow else -(2 ** (self.bits - 1))

    @property
    def needs_clip(self) -> bool:
        """Whether an INT8 QuantizeLinear alone would saturate at other bounds than this grid's."""
        return (self.qmin, self.qmax) != (-128, 127)

    def scale_for(self, amax: torch.Tensor) -> torch.Tensor:
        """Scale mapping `amax` to `qmax`; a zero range is refused rather than silently patched."""
        return _checked_scale(amax, self.qmax)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Grid values (as floats) of x / scale: round half to even, as ONNX QuantizeLinear does, then saturate."""
        return torch.clamp(torch.round(x / scale), self.qmin, self.qmax)

    def __str__(self) -> str:
        return f"INT{self.bits}" + (" (as UINT8, zero point 128)" if self.unsigned_storage else "")


@dataclass(frozen=True)
class Fp8Grid:
    """FP8 E4M3FN: round to nearest even on the E4M3 value set, saturating at +-448."""

    storage_dtype = torch.float8_e4m3fn
    zero_point = 0
    qmax = 448.0
    qmin = -448.0
    bits = 8
    needs_clip = False

    def scale_for(self, amax: torch.Tensor) -> torch.Tensor:
        return _checked_scale(amax, self.qmax)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x / scale, self.qmin, self.qmax).to(torch.float8_e4m3fn).to(x.dtype)

    def __str__(self) -> str:
        return "FP8-E4M3"


Grid = IntGrid | Fp8Grid
