"""Fake-quant wrappers for Conv2d and Linear: a per-tensor activation quantizer on the input and a
per-output-channel weight quantizer, computed with the functions that also define the ONNX export."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from stepquant.quant.functional import DequantizeWeight, FakeQuantize
from stepquant.quant.grid import Grid


class Observer(Protocol):
    def update(self, x: torch.Tensor) -> None: ...


class ActivationQuantizer(nn.Module):
    """Per-tensor symmetric fake quantization; until calibrated it only observes (or passes through)."""

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("scale", torch.tensor(float("nan")))
        self.observer: Observer | None = None
        self.enabled = True

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.scale))

    def set_amax(self, amax: torch.Tensor | float) -> None:
        self.scale = self.grid.scale_for(torch.as_tensor(amax, dtype=torch.float32)).reshape(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x.detach())
        if not self.enabled:
            return x
        if not self.calibrated:
            raise RuntimeError("activation quantizer used before calibration: run a calibrator first")
        return FakeQuantize.apply(x, self.scale, self.grid)

    def extra_repr(self) -> str:
        return f"{self.grid}, amax={float(self.scale) * self.grid.qmax:.5g}"


class WeightQuantizer(nn.Module):
    """Symmetric quantization of a weight, held as quantized values (int8 or float8 storage) and scales:
    one scale per output channel, or one per tensor (FP8, as modelopt and TensorRT's FP8 kernels use)."""

    def __init__(self, grid: Grid, weight: torch.Tensor, per_channel: bool = True) -> None:
        super().__init__()
        self.grid = grid
        amax = weight.detach().abs().flatten(1).amax(dim=1) if per_channel else weight.detach().abs().max()
        # A channel of all-zero weights quantizes to zeros whatever its scale; give it a positive one.
        amax = torch.where(amax > 0, amax, torch.ones_like(amax))
        self.register_buffer("scale", self.grid.scale_for(amax))
        self.register_buffer("qweight", self.quantized(weight, self.scale))
        self.enabled = True

    def quantized(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest grid values of `weight`, in the grid's storage type."""
        shape = (-1,) + (1,) * (weight.dim() - 1) if scale.numel() > 1 else ()
        return self.grid.quantize(weight.detach(), scale.reshape(shape)).to(self.grid.storage_dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return DequantizeWeight.apply(self.qweight, self.scale)

    def extra_repr(self) -> str:
        return f"{self.grid}, scales={self.scale.numel()}"


class QuantizedLayer(nn.Module):
    """A Conv2d or Linear whose input and weight are fake-quantized; bias stays in floating point."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, weight_grid: Grid, act_grid: Grid, per_channel: bool = True) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"only Conv2d and Linear can be quantized, got {type(layer).__name__}")
        self.layer = layer
        self.input_quantizer = ActivationQuantizer(act_grid)
        self.weight_quantizer = WeightQuantizer(weight_grid, layer.weight, per_channel)

    def set_enabled(self, enabled: bool) -> None:
        self.input_quantizer.enabled = enabled
        self.weight_quantizer.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        weight = self.weight_quantizer(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)
