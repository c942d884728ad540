"""Autograd functions whose forward is the torch simulation and whose ONNX symbolic is the Q/DQ
graph TensorRT and onnxruntime execute, so simulation and deployment share one definition."""

from __future__ import annotations

import torch

from stepquant.quant.grid import Grid

# ONNX attribute naming the quantizer module a Q/DQ node was exported from; export/onnx_export.py moves it
# into the model's metadata (it is no attribute of the standard ops), where the layer-wise parity reads it
QUANTIZER_ATTRIBUTE = "stepquant_quantizer"


def _tagged(g, op: str, *inputs, name: str | None, **attributes):
    if name is not None:
        attributes[f"{QUANTIZER_ATTRIBUTE}_s"] = name
    return g.op(op, *inputs, **attributes)


class FakeQuantize(torch.autograd.Function):
    """x -> grid.quantize(x / scale) * scale, exported as QuantizeLinear -> DequantizeLinear whose zero
    point's type (INT8, UINT8 with zero point 128, or FLOAT8E4M3FN) selects the format.

    Integer grids narrower than INT8 are exported with a Clip in front of an INT8 Q/DQ pair, which gives
    the same values on any runtime. The backward pass is the straight-through estimator for x and, when
    the scale is being learned (reconstruction), LSQ's gradient for the scale: q - x/s inside the grid,
    the clipped grid bound outside. `name`, when given, tags the exported Q and DQ nodes (QUANTIZER_ATTRIBUTE).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, grid: Grid, name: str | None = None) -> torch.Tensor:
        ctx.save_for_backward(x, scale)
        ctx.grid = grid
        return grid.quantize(x, scale) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale = ctx.saved_tensors
        inside = (x >= ctx.grid.qmin * scale) & (x <= ctx.grid.qmax * scale)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            q = ctx.grid.quantize(x, scale)
            grad_scale = (grad * torch.where(inside, q - x / scale, q)).sum().reshape(scale.shape)
        return grad * inside, grad_scale, None, None

    @staticmethod
    def symbolic(g, x, scale, grid: Grid, name: str | None = None):
        zero_point = g.op("Constant", value_t=torch.tensor(grid.zero_point, dtype=grid.storage_dtype))
        if grid.needs_clip:
            low = g.op("Mul", scale, g.op("Constant", value_t=torch.tensor(float(grid.qmin))))
            high = g.op("Mul", scale, g.op("Constant", value_t=torch.tensor(float(grid.qmax))))
            x = g.op("Clip", x, low, high)
        quantized = _tagged(g, "QuantizeLinear", x, scale, zero_point, name=name)
        return _tagged(g, "DequantizeLinear", quantized, scale, zero_point, name=name)


class DequantizeWeight(torch.autograd.Function):
    """Quantized weights (int8 or float8 storage) times their scale (one per output channel, or one per
    tensor), exported as DequantizeLinear on the quantized initializer: the weight-only form TensorRT
    accepts, which keeps the deployed values exactly the simulated ones. `name` tags the exported node."""

    @staticmethod
    def forward(ctx, qweight: torch.Tensor, scale: torch.Tensor, name: str | None = None) -> torch.Tensor:
        shape = (-1,) + (1,) * (qweight.dim() - 1) if scale.numel() > 1 else ()
        return qweight.to(scale.dtype) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, qweight, scale, name: str | None = None):
        channels = scale.type().sizes()
        dtype = {"Char": torch.int8}.get(qweight.type().scalarType(), torch.float8_e4m3fn)
        zero_point = g.op("Constant", value_t=torch.zeros(channels, dtype=dtype))
        axis = {"axis_i": 0} if channels and channels[0] > 1 else {}
        return _tagged(g, "DequantizeLinear", qweight, scale, zero_point, name=name, **axis)
