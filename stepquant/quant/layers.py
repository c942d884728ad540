"""Fake-quant wrappers for Conv2d and Linear: a per-tensor activation quantizer on the input and a
per-output-channel weight quantizer, computed with the functions that also define the ONNX export."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from stepquant.quant.functional import DequantizeWeight, FakeQuantize
from stepquant.quant.grid import Grid
from stepquant.quant.rounding import LearnedRounding


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
        self.export_name: str | None = None  # tags its exported Q/DQ nodes (export/onnx_export.py sets it)

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.scale))

    def set_amax(self, amax: torch.Tensor | float) -> None:
        self.scale = self.grid.scale_for(torch.as_tensor(amax, dtype=torch.float32)).reshape(()).to(self.scale.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x.detach())
        if not self.enabled:
            return x
        if not self.calibrated:
            raise RuntimeError("activation quantizer used before calibration: run a calibrator first")
        return FakeQuantize.apply(x, self.scale, self.grid, self.export_name)

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
        self.register_buffer("qweight", self.quantized(weight))
        self.rounding: LearnedRounding | None = None  # set while a reconstruction learns the rounding
        self.enabled = True
        self.export_name: str | None = None  # tags its exported DequantizeLinear (export/onnx_export.py sets it)

    def _broadcast_scale(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scale.reshape((-1,) + (1,) * (weight.dim() - 1) if self.scale.numel() > 1 else ())

    def quantized(self, weight: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest grid values of `weight`, in the grid's storage type."""
        return self.grid.quantize(weight.detach(), self._broadcast_scale(weight)).to(self.grid.storage_dtype)

    def learn_rounding(self, weight: torch.Tensor) -> LearnedRounding:
        """Start (or resume) learning this weight's rounding; the learned choice replaces `qweight` on
        `bake_rounding`."""
        if self.rounding is None:
            self.rounding = LearnedRounding(weight, self._broadcast_scale(weight), self.grid)
        self.rounding.soft = True
        return self.rounding

    def bake_rounding(self) -> None:
        """Store the learned (hard) rounding as the integer weights the graph exports, and drop alpha."""
        if self.rounding is not None:
            self.rounding.soft = False
            with torch.no_grad():
                self.qweight = self.rounding.values().to(self.grid.storage_dtype)
            self.rounding = None

    def forward(self, weight: torch.Tensor, shape: torch.Size | None = None) -> torch.Tensor:
        """The fake-quantized `weight`, viewed as `shape` when given. The integer weights are the ones
        viewed, so the export stores them in that shape and the DequantizeLinear feeds its consumer
        directly (onnxruntime fuses DQ -> Conv into an integer kernel, not DQ -> Reshape -> Conv)."""

        def viewed(tensor: torch.Tensor) -> torch.Tensor:  # as stored otherwise: the initializer keeps its name
            return tensor if shape is None else tensor.view(shape)

        if not self.enabled:
            return viewed(weight)
        if self.rounding is not None:
            return viewed(self.rounding.values() * self._broadcast_scale(weight))
        return DequantizeWeight.apply(viewed(self.qweight), self.scale, self.export_name)

    def extra_repr(self) -> str:
        return f"{self.grid}, scales={self.scale.numel()}"


class QuantizedLayer(nn.Module):
    """A Conv2d or Linear whose input and weight are fake-quantized; bias stays in floating point.

    `output_quantizer` stays None except for targets whose integer kernels also produce quantized
    outputs (onnxruntime's QLinearConv needs a QuantizeLinear after the Conv to fuse)."""

    def __init__(
        self, layer: nn.Conv2d | nn.Linear, weight_grid: Grid, act_grid: Grid, per_channel: bool = True
    ) -> None:
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"only Conv2d and Linear can be quantized, got {type(layer).__name__}")
        self.layer = layer
        self.input_quantizer = ActivationQuantizer(act_grid)
        self.weight_quantizer = WeightQuantizer(weight_grid, layer.weight, per_channel)
        self.output_quantizer: ActivationQuantizer | None = None

    def set_enabled(self, enabled: bool) -> None:
        self.input_quantizer.enabled = enabled
        self.weight_quantizer.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(x)
        weight = self.weight_quantizer(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            out = self.layer._conv_forward(x, weight, self.layer.bias)
        else:
            out = F.linear(x, weight, self.layer.bias)
        return out if self.output_quantizer is None else self.output_quantizer(out)

    def pointwise(self, x: torch.Tensor, quantize_input: bool = True) -> torch.Tensor:
        """This Linear layer applied along dim 1 of a (batch, features, height, width) tensor: a 1x1
        convolution with the same values, which onnxruntime runs as QLinearConv when the output is quantized.
        `quantize_input=False`: `x` is already this layer's input quantizer's output (shared by several layers)."""
        out_features, in_features = self.layer.weight.shape
        weight = self.weight_quantizer(self.layer.weight, torch.Size((out_features, in_features, 1, 1)))
        out = F.conv2d(self.input_quantizer(x) if quantize_input else x, weight, self.layer.bias)
        return out if self.output_quantizer is None else self.output_quantizer(out)


class SplitQuantizedLayer(nn.Module):
    """A layer consuming cat([h, skip], dim=1) run as two layers, one per channel group, each with its
    own input and weight quantizers: Q(X)Q(W) = Q(X1)Q(W1) + Q(X2)Q(W2), Q-Diffusion's split for decoder
    layers whose two inputs have very different ranges. Exports as two quantized layers and an Add."""

    def __init__(
        self, layer: nn.Conv2d | nn.Linear, split: int, weight_grid: Grid, act_grid: Grid, per_channel: bool = True
    ) -> None:
        super().__init__()
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError("only ungrouped convolutions can be split")
        in_features = layer.weight.shape[1]
        if not 0 < split < in_features:
            raise ValueError(f"split {split} is outside the layer's {in_features} input channels")
        self.split = split
        self.parts = nn.ModuleList(
            QuantizedLayer(_part(layer, slice(start, stop), bias), weight_grid, act_grid, per_channel)
            for start, stop, bias in ((0, split, True), (split, in_features, False))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts[0](x[:, : self.split]) + self.parts[1](x[:, self.split :])


def _part(layer: nn.Conv2d | nn.Linear, channels: slice, bias: bool) -> nn.Conv2d | nn.Linear:
    """A copy of `layer` restricted to input `channels`, with or without the bias."""
    weight = layer.weight.detach()[:, channels]
    if isinstance(layer, nn.Conv2d):
        part = nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            bias=bias and layer.bias is not None,
            padding_mode=layer.padding_mode,
        )
    else:
        part = nn.Linear(weight.shape[1], weight.shape[0], bias=bias and layer.bias is not None)
    with torch.no_grad():
        part.weight.copy_(weight)
        if part.bias is not None:
            part.bias.copy_(layer.bias.detach())
    return part
