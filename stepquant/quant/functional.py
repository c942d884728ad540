"""Autograd functions whose forward is the torch simulation and whose ONNX symbolic is the Q/DQ
graph TensorRT and onnxruntime execute, so simulation and deployment share one definition."""

from __future__ import annotations

import torch


class FakeQuantize(torch.autograd.Function):
    """x -> clamp(round(x / scale), qmin, qmax) * scale, exported as QuantizeLinear -> DequantizeLinear.

    Grids narrower than INT8 are exported with a Clip in front of an INT8 Q/DQ pair, which gives the
    same values on any runtime. The backward pass is the straight-through estimator.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        ctx.save_for_backward(x, scale)
        ctx.bounds = (qmin, qmax)
        return torch.clamp(torch.round(x / scale), qmin, qmax) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        inside = (x >= qmin * scale) & (x <= qmax * scale)
        return grad * inside, None, None, None

    @staticmethod
    def symbolic(g, x, scale, qmin: int, qmax: int):
        zero_point = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
        if (qmin, qmax) != (-128, 127):
            low = g.op("Mul", scale, g.op("Constant", value_t=torch.tensor(float(qmin))))
            high = g.op("Mul", scale, g.op("Constant", value_t=torch.tensor(float(qmax))))
            x = g.op("Clip", x, low, high)
        quantized = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", quantized, scale, zero_point)


class DequantizeWeight(torch.autograd.Function):
    """Integer weights (int8 storage) times per-output-channel scales, exported as DequantizeLinear
    on an INT8 initializer (axis 0), the weight-only form TensorRT accepts and that keeps the
    deployed integers exactly the simulated ones."""

    @staticmethod
    def forward(ctx, weight_int: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (weight_int.dim() - 1)
        return weight_int.to(scale.dtype) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, weight_int, scale):
        channels = weight_int.type().sizes()[0]
        zero_point = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.int8))
        return g.op("DequantizeLinear", weight_int, scale, zero_point, axis_i=0)
