"""`quantize_(model, spec)`: the one entry point that turns Conv2d/Linear layers into fake-quant layers."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from stepquant.quant.layers import QuantizedLayer
from stepquant.quant.spec import QuantSpec


def quantize_(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Wrap, in place, every Conv2d and Linear not excluded by `spec`; return the wrapped names.

    Weights are quantized at once (they need no data); activation quantizers wait for a calibrator.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in (nn.Conv2d, nn.Linear) and not spec.excludes(name)
    ]
    if not targets:
        raise ValueError("no Conv2d or Linear layer is left to quantize after the exclusions")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLayer(module, spec.weight_grid, spec.act_grid, spec.per_channel_weights))
    return [name for name, _ in targets]


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantizedLayer]]:
    """(name, layer) for every fake-quant layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            yield name, module
