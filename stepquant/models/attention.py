"""diffusers attention with its core written out, so an export target can reshape just that core.

diffusers' AttnProcessor2_0 ends in `F.scaled_dot_product_attention`; `ExplicitAttentionProcessor` runs
the same block (projections, norms, mask, residual, rescale) with the core as plain matmuls and a softmax
in `attend()` and `probabilities()`. Two cores build on it: FP8 Q/DQ around the matmuls for TensorRT (quant/attention.py), and
head groups for onnxruntime's CPU provider (`HeadGroupedAttentionProcessor`, below).
"""

from __future__ import annotations

import torch
from torch import nn

SCORE_BLOCK_BYTES = 8 * 2**20  # float32 scores of one head group: well inside a server L3 (32 MiB here)


class ExplicitAttentionProcessor(nn.Module):
    """A diffusers attention processor computing softmax(Q·Kᵀ·scale + mask)·V as explicit ops."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        # explicit: diffusers' Attention passes a processor only the keyword arguments its __call__ names
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """Attention of (batch, heads, tokens, head_dim) tensors; `mask` is added to the scores."""
        scores = query @ key.transpose(-1, -2) * scale
        if mask is not None:
            scores = scores + mask
        return self.probabilities(scores) @ value

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Softmax over the keys: the operand of P·V."""
        return scores.softmax(dim=-1)

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

        hidden_states = self.attend(query, key, value, attention_mask, attn.scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def heads_per_group(heads: int, batch: int, query_tokens: int, key_tokens: int, block_bytes: int = SCORE_BLOCK_BYTES) -> int:
    """The most heads (a divisor of `heads`, at least 1) whose float32 scores at `batch` fit `block_bytes`."""
    per_head = batch * query_tokens * key_tokens * 4
    return max(g for g in range(1, heads + 1) if heads % g == 0 and (g == 1 or g * per_head <= block_bytes))


class HeadGroupedAttentionProcessor(ExplicitAttentionProcessor):
    """The same attention, computed one group of heads at a time (Split -> per-group core -> Concat).

    onnxruntime's CPU provider runs a graph node by node, so the plain core writes the whole score
    tensor (batch x heads x tokens²: 67 MB per layer for the cifar10 UNet at batch 8) to memory, then
    reads it back for Softmax and again for P·V. In groups, each group's scores stay in cache between
    the three ops. The grouping is fixed at export for the batch the graph is tuned for; any batch runs,
    with groups sized for that one. Results are identical (each head is computed alone either way).

    With `channels_first`, a UNet's spatial self-attention also keeps its (batch, channels, tokens)
    layout: projections are W·x, each head is a free reshape, and the transposed views the core needs
    are folded by onnxruntime into its matmuls, instead of token-major copies of the input, Q, K, V and
    output (1.09-1.13x for one cifar10 attention layer, docs/BENCHMARKS.md).
    """

    def __init__(self, batch: int, block_bytes: int = SCORE_BLOCK_BYTES, channels_first: bool = True) -> None:
        super().__init__()
        self.batch = batch
        self.block_bytes = block_bytes
        self.channels_first = channels_first

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        groups = self._groups(query, key, value, mask, query.shape[2], key.shape[2])
        return torch.cat([ExplicitAttentionProcessor.attend(self, q, k, v, m, scale) for q, k, v, m in groups], 1)

    def _groups(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                query_tokens: int, key_tokens: int) -> list[tuple]:
        """(query, key, value, mask) per head group: split along the heads, dim 1 in either layout."""
        heads = query.shape[1]
        group = heads_per_group(heads, self.batch, query_tokens, key_tokens, self.block_bytes)
        if group == heads:
            return [(query, key, value, mask)]
        masks = mask.split(group, 1) if mask is not None and mask.shape[1] == heads else [mask] * (heads // group)
        return list(zip(query.split(group, 1), key.split(group, 1), value.split(group, 1), masks))

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.channels_first and _is_plain_spatial_self_attention(attn, hidden_states, encoder_hidden_states, attention_mask)):
            return super().forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, channels, height, width = hidden_states.shape
        x = hidden_states.view(batch, channels, height * width)
        if attn.group_norm is not None:
            x = attn.group_norm(x)
        # (batch, heads, head_dim, tokens) by reshape; each group's core sees transposed views, which
        # onnxruntime folds into its MatMuls. Transposed after the split, not before: onnxruntime does not
        # move a Transpose through Split, so one before it stays a copy (3 Transposes left per layer, not 1)
        query, key, value = (_channels_first_linear(layer, x).view(batch, attn.heads, -1, height * width)
                             for layer in (attn.to_q, attn.to_k, attn.to_v))
        groups = self._groups(query, key, value, None, height * width, height * width)
        cores = (ExplicitAttentionProcessor.attend(self, *(t.transpose(-1, -2) for t in (q, k, v)), None, attn.scale)
                 for q, k, v, _ in groups)
        out = torch.cat([core.transpose(-1, -2) for core in cores], 1)
        out = _channels_first_linear(attn.to_out[0], out.reshape(batch, channels, height * width))
        out = attn.to_out[1](out).view(batch, channels, height, width)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _channels_first_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer` applied along dim 1 of a (batch, features, tokens) tensor."""
    y = torch.matmul(layer.weight, x)
    return y if layer.bias is None else y + layer.bias[:, None]


def _is_plain_spatial_self_attention(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                                     attention_mask: torch.Tensor | None) -> bool:
    """A UNet block's attention over its own feature map, with float Linear projections and nothing else."""
    return (hidden_states.ndim == 4 and encoder_hidden_states is None and attention_mask is None
            and attn.spatial_norm is None and attn.norm_q is None and attn.norm_k is None
            and all(type(layer) is nn.Linear for layer in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])))


def group_attention_heads_(model: nn.Module, batch: int, block_bytes: int = SCORE_BLOCK_BYTES) -> int:
    """Give every diffusers Attention in `model` a head-grouped processor; return how many."""
    from diffusers.models.attention_processor import Attention

    layers = [module for module in model.modules() if isinstance(module, Attention)]
    for layer in layers:
        layer.set_processor(HeadGroupedAttentionProcessor(batch, block_bytes))
    return len(layers)
