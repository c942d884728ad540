"""Placement profiles: which Q/DQ graph a calibrated fake-quant model becomes for each runtime.

- `tensorrt`: symmetric INT8 (or FP8) Q/DQ on the inputs and weights of Conv/Linear, zero point 0, as
  TensorRT's explicit quantization wants. onnxruntime executes it correctly, but its CPU provider keeps
  such convolutions in float (DQ -> Conv -> ...), so it is a reference there, not a fast path.
- `onnxruntime-cpu`: the same scales, with activations stored as UINT8 (zero point 128: the same grid
  values) beside INT8 weights, and Q/DQ only where onnxruntime fuses it into an integer kernel: a
  QuantizeLinear after every quantized Conv, so DQ -> Conv -> Q becomes QLinearConv (U8S8, the VNNI
  fast path). The q/k/v/out projections of a UNet's spatial self-attention get output quantizers too
  and run as 1x1 convolutions (QLinearConv), their Q·Kᵀ as MatMulIntegerToFloat (quant/attention_processors.py).
  Other Linear layers (the time embedding) stay float. The residual skip Q/DQ that TensorRT fuses into
  Conv+Add is dropped (on the CPU it is two extra passes and no kernel).
  The output quantizers are the one addition; the caller calibrates them on the same calibration set
  (`calibrate_ranges(..., only_uncalibrated=True)`). Attention is computed in head groups whose scores
  stay in cache, channels-first where it is a UNet's spatial self-attention: the same values, less
  memory traffic.
"""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from stepquant.bundle.targets import TargetError, target_profile
from stepquant.export.shapes import ShapeProfile
from stepquant.quant.attention_processors import group_attention_heads_, is_spatial_self_attention
from stepquant.quant.grid import IntGrid
from stepquant.quant.layers import ActivationQuantizer
from stepquant.quant.quantize import ResidualQuantizer, activation_quantizers, quantized_layers


def check_target(model: nn.Module, target: str) -> None:
    """Refuse a quantized `model` the `target` profile cannot serve (before any calibration work)."""
    profile = target_profile(target)
    if "fp8" not in profile.formats and any(not isinstance(q.grid, IntGrid) for q in activation_quantizers(model)):
        raise TargetError(
            f"the {target} target needs integer quantization (--format int8): its CPU kernels have no FP8"
        )
    if profile.integer_kernels and not any(isinstance(layer.layer, nn.Conv2d) for _, layer in quantized_layers(model)):
        raise TargetError(
            f"the {target} profile runs quantized convolutions (and a UNet's spatial attention) as "
            "integer kernels and keeps other Linear layers float; this model has no quantized convolution "
            "(a transformer?), so its graph would be all float: use --target tensorrt"
        )


def for_target(model: nn.Module, target: str, batch: int = ShapeProfile.batch.opt) -> nn.Module:
    """The model whose export is the graph for `target`: `model` itself for tensorrt; for
    onnxruntime-cpu a copy with UINT8-stored activation grids, an (uncalibrated) output quantizer on
    every quantized Conv and spatial self-attention projection, other Linear layers float, no residual
    quantizers and attention in head groups sized for `batch`. `model` is left unchanged."""
    check_target(model, target)
    if not target_profile(target).integer_kernels:
        return model
    retargeted = copy.deepcopy(model)
    group_attention_heads_(retargeted, batch)
    for block in retargeted.modules():
        if isinstance(getattr(block, "conv_shortcut", None), ResidualQuantizer):
            block.conv_shortcut = block.conv_shortcut.shortcut
    for quantizer in activation_quantizers(retargeted):
        quantizer.grid = dataclasses.replace(quantizer.grid, unsigned_storage=True)
    projections = _spatial_attention_projections(retargeted)
    for name, layer in list(quantized_layers(retargeted)):
        if isinstance(layer.layer, nn.Conv2d) or name in projections:
            layer.output_quantizer = ActivationQuantizer(IntGrid(8, narrow=False, unsigned_storage=True))
        else:  # back to the float layer (its input Q/DQ would only add work, see the module docstring)
            parent, _, child = name.rpartition(".")
            setattr(retargeted.get_submodule(parent) if parent else retargeted, child, layer.layer)
    return retargeted


def _spatial_attention_projections(model: nn.Module) -> set[str]:
    """Names of the q/k/v/out projections of every UNet spatial self-attention in `model`: the CPU
    profile runs them as 1x1 QLinearConv (quant/attention_processors.py)."""
    from diffusers.models.attention_processor import Attention

    return {
        f"{name}.{projection}"
        for name, module in model.named_modules()
        if isinstance(module, Attention) and is_spatial_self_attention(module)
        for projection in ("to_q", "to_k", "to_v", "to_out.0")
    }
