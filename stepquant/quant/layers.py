"""Fake-quant wrappers for Conv2d and Linear: a per-tensor activation quantizer on the input and a
per-output-channel weight quantizer, computed with the functions that also define the ONNX export."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from stepquant.quant.functional import DequantizeWeight, FakeQuantize
from stepquant.quant.grid import IntGrid


class Observer(Protocol):
    def update(self, x: torch.Tensor) -> None: ...


class ActivationQuantizer(nn.Module):
    """Per-tensor symmetric fake quantization; until calibrated it only observes (or passes through)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.grid = IntGrid(bits, narrow=False)
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
        return FakeQuantize.apply(x, self.scale, self.grid.qmin, self.grid.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.grid.bits}, amax={float(self.scale) * self.grid.qmax:.5g}"


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric quantization of a weight, held as int8 integers and scales."""

    def __init__(self, bits: int, weight: torch.Tensor) -> None:
        super().__init__()
        self.grid = IntGrid(bits, narrow=True)
        amax = weight.detach().abs().flatten(1).amax(dim=1)
        # A channel of all-zero weights quantizes to zeros whatever its scale; give it a positive one.
        amax = torch.where(amax > 0, amax, torch.ones_like(amax))
        self.register_buffer("scale", self.grid.scale_for(amax))
        self.register_buffer("weight_int", self.integers(weight, self.scale))
        self.enabled = True

    def integers(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest integers of `weight` on this grid (int8 storage whatever the bit width)."""
        shape = (-1,) + (1,) * (weight.dim() - 1)
        return self.grid.to_int(weight.detach(), scale.reshape(shape)).to(torch.int8)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return DequantizeWeight.apply(self.weight_int, self.scale)

    def extra_repr(self) -> str:
        return f"bits={self.grid.bits}, channels={self.scale.numel()}"


class QuantizedLayer(nn.Module):
    """A Conv2d or Linear whose input and weight are fake-quantized; bias stays in floating point."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"only Conv2d and Linear can be quantized, got {type(layer).__name__}")
        self.layer = layer
        self.input_quantizer = ActivationQuantizer(act_bits)
        self.weight_quantizer = WeightQuantizer(weight_bits, layer.weight)

    def set_enabled(self, enabled: bool) -> None:
        self.input_quantizer.enabled = enabled
        self.weight_quantizer.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        weight = self.weight_quantizer(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)
