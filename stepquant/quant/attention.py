"""FP8 attention: Q/DQ on the inputs of both batched matmuls of a diffusers `Attention`.

TensorRT fuses attention into one FP8 MHA kernel when Q and K carry Q/DQ before Q·Kᵀ and the softmax
probabilities and V before P·V (head_dim a multiple of 16; there is no INT8 fused attention). This
processor computes diffusers' attention with those four quantizers around its explicit core
(quant/attention_processors.py), so the simulation and the exported graph both hold them.
"""

from __future__ import annotations

import torch
from torch import nn

from stepquant.quant.attention_processors import ExplicitAttentionProcessor
from stepquant.quant.grid import Grid
from stepquant.quant.layers import ActivationQuantizer

FUSED_HEAD_DIM_MULTIPLE = 16  # TensorRT's FP8 MHA kernels need head_dim % 16 == 0


class QuantizedAttentionProcessor(ExplicitAttentionProcessor):
    """diffusers attention with a quantizer on each input of Q·Kᵀ and P·V."""

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.query_quantizer = ActivationQuantizer(grid)
        self.key_quantizer = ActivationQuantizer(grid)
        self.value_quantizer = ActivationQuantizer(grid)
        self.softmax_quantizer = ActivationQuantizer(grid)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        return super().attend(
            self.query_quantizer(query), self.key_quantizer(key), self.value_quantizer(value), mask, scale
        )

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        return self.softmax_quantizer(super().probabilities(scores))


def quantize_attention_(model: nn.Module, grid: Grid, excludes) -> list[str]:
    """Give every diffusers Attention whose heads TensorRT can fuse (and whose name `excludes` keeps) the
    quantized processor; return the processors' module names."""
    from diffusers.models.attention_processor import Attention

    names = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and not excludes(name):
            head_dim = module.inner_dim // module.heads
            if head_dim % FUSED_HEAD_DIM_MULTIPLE == 0:
                module.set_processor(QuantizedAttentionProcessor(grid))
                names.append(f"{name}.processor")
    return names
