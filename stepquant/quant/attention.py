"""FP8 attention: Q/DQ on the inputs of both batched matmuls of a diffusers `Attention`.

TensorRT fuses attention into one FP8 MHA kernel when Q and K carry Q/DQ before Q·Kᵀ and the softmax
probabilities and V before P·V (head_dim a multiple of 16; there is no INT8 fused attention). This
processor computes diffusers' scaled dot-product attention with those four quantizers as explicit ops,
so the simulation and the exported graph both hold them; everything around the matmuls (projections,
norms, residual, rescale) is diffusers' AttnProcessor2_0 unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from stepquant.quant.grid import Grid
from stepquant.quant.layers import ActivationQuantizer

FUSED_HEAD_DIM_MULTIPLE = 16  # TensorRT's FP8 MHA kernels need head_dim % 16 == 0


class QuantizedAttentionProcessor(nn.Module):
    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.query_quantizer = ActivationQuantizer(grid)
        self.key_quantizer = ActivationQuantizer(grid)
        self.value_quantizer = ActivationQuantizer(grid)
        self.softmax_quantizer = ActivationQuantizer(grid)

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        # explicit: diffusers' Attention passes a processor only the keyword arguments its __call__ names
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scores = self.query_quantizer(query) @ self.key_quantizer(key).transpose(-1, -2) * head_dim**-0.5
        if attention_mask is not None:
            scores = scores + attention_mask
        probabilities = self.softmax_quantizer(scores.softmax(dim=-1))
        hidden_states = probabilities @ self.value_quantizer(value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


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
