"""`quantize_(model, spec)`: the one entry point that turns Conv2d/Linear layers into fake-quant layers
and, for the TensorRT target, puts a quantizer on the skip input of every ResNet block's residual Add."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from stepquant.quant.attention import quantize_attention_
from stepquant.quant.layers import ActivationQuantizer, QuantizedLayer, SplitQuantizedLayer, WeightQuantizer
from stepquant.quant.spec import QuantSpec


class ResidualQuantizer(nn.Module):
    """Takes the place of a ResNet block's `conv_shortcut` (diffusers applies it to the skip input just
    before `skip + conv2(...)`), runs the original shortcut if there was one, and fake-quantizes the
    result. The Q/DQ lands on the Add's skip input: the placement TensorRT fuses into Conv+Add."""

    def __init__(self, shortcut: nn.Module | None, quantizer: ActivationQuantizer) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.quantizer = quantizer

    def forward(self, x):
        return self.quantizer(x if self.shortcut is None else self.shortcut(x))


def _quantize_residuals(model: nn.Module, spec: QuantSpec) -> list[str]:
    blocks = [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "conv_shortcut") and "Resnet" in type(module).__name__ and not spec.excludes(name)
    ]
    for _, block in blocks:
        block.conv_shortcut = ResidualQuantizer(block.conv_shortcut, ActivationQuantizer(spec.residual_grid))
    return [f"{name}.conv_shortcut" for name, _ in blocks]


def skip_concat_splits(model: nn.Module) -> dict[str, int]:
    """Layers of a diffusers UNet decoder that consume cat([h, skip]), mapped to the channel where the
    skip features start: each decoder ResNet block's conv1 (after its norm and activation, which keep
    the channel order) and its conv_shortcut. h has the channels of the previous decoder ResNet (the
    mid block's last one for the first)."""
    splits: dict[str, int] = {}
    for unet_name, unet in model.named_modules():
        if not (hasattr(unet, "up_blocks") and getattr(unet, "mid_block", None) is not None):
            continue
        previous = unet.mid_block.resnets[-1].out_channels
        for b, block in enumerate(unet.up_blocks):
            for r, resnet in enumerate(block.resnets):
                prefix = f"{unet_name}.up_blocks.{b}.resnets.{r}".lstrip(".")
                splits[f"{prefix}.conv1"] = previous
                if getattr(resnet, "conv_shortcut", None) is not None:
                    splits[f"{prefix}.conv_shortcut"] = previous
                previous = resnet.out_channels
    return splits


def quantize_(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Wrap, in place, every Conv2d and Linear not excluded by `spec` (and the residual skip inputs when
    `spec.quantize_residuals`, and for FP8 the attention matmuls); return the names of the wrapped modules.

    Weights are quantized at once (they need no data); activation quantizers wait for a calibrator.
    With `spec.split_skip_concat`, decoder layers fed cat([h, skip]) get one quantizer pair per group.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in (nn.Conv2d, nn.Linear) and not spec.excludes(name)
    ]
    if not targets:
        raise ValueError("no Conv2d or Linear layer is left to quantize after the exclusions")
    splits = skip_concat_splits(model) if spec.split_skip_concat else {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        grids = (spec.weight_grid, spec.act_grid, spec.per_channel_weights)
        setattr(
            parent,
            child,
            SplitQuantizedLayer(module, splits[name], *grids) if name in splits else QuantizedLayer(module, *grids),
        )
    residuals = _quantize_residuals(model, spec) if spec.quantize_residuals else []
    attention = quantize_attention_(model, spec.act_grid, spec.excludes) if spec.fp8_attention else []
    return [name for name, _ in targets] + residuals + attention


def round_scales_(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every scale to a value `dtype` represents exactly, so the simulation quantizes on the same
    grid as a graph whose Q/DQ scales are stored in `dtype` (FP16 scales for FP16 engines)."""
    for module in model.modules():
        if isinstance(module, (ActivationQuantizer, WeightQuantizer)):
            module.scale = module.scale.to(dtype).to(module.scale.dtype)


def bake_rounding_(model: nn.Module) -> None:
    """Store every learned rounding as the integer weights the exported graph carries."""
    for module in model.modules():
        if isinstance(module, WeightQuantizer):
            module.bake_rounding()


def activation_quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    """Every activation quantizer (layer inputs and residual skips), in module order."""
    return [module for module in model.modules() if isinstance(module, ActivationQuantizer)]


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantizedLayer]]:
    """(name, layer) for every fake-quant layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            yield name, module
