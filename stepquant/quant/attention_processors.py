"""diffusers attention with its core written out, so an export target can reshape just that core.

diffusers' AttnProcessor2_0 ends in `F.scaled_dot_product_attention`; `ExplicitAttentionProcessor` runs
the same block (projections, norms, mask, residual, rescale) with the core as plain matmuls and a softmax
in `attend()` and `probabilities()`. Two cores build on it: FP8 Q/DQ around the matmuls for TensorRT
(quant/attention.py), and head groups for onnxruntime's CPU provider (`HeadGroupedAttentionProcessor`, below).
"""

from __future__ import annotations

import torch
from torch import nn

from stepquant.quant.layers import QuantizedLayer

SCORE_BLOCK_BYTES = 8 * 2**20  # float32 scores of one head group: well inside a server L3 (32 MiB here)


class ExplicitAttentionProcessor(nn.Module):
    """A diffusers attention processor computing softmax(Q·Kᵀ·scale + mask)·V as explicit ops."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # explicit: diffusers' Attention passes a processor only the keyword arguments its __call__ names
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """Attention of (batch, heads, tokens, head_dim) tensors; `mask` is added to the scores."""
        scores = query @ key.transpose(-1, -2) * scale
        if mask is not None:
            scores = scores + mask
        return self.probabilities(scores) @ value

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Softmax over the keys: the operand of P·V."""
        return scores.softmax(dim=-1)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states if encoder_hidden_states is None else encoder_hidden_states
        ).shape
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


def heads_per_group(
    heads: int, batch: int, query_tokens: int, key_tokens: int, block_bytes: int = SCORE_BLOCK_BYTES
) -> int:
    """The most heads (a divisor of `heads`, at least 1) whose float32 scores at `batch` fit `block_bytes`."""
    per_head = batch * query_tokens * key_tokens * 4
    return max(g for g in range(1, heads + 1) if heads % g == 0 and (g == 1 or g * per_head <= block_bytes))


class HeadGroupedAttentionProcessor(ExplicitAttentionProcessor):
    """The same attention, computed one group of heads at a time (Split -> per-group core -> Concat).

    onnxruntime's CPU provider runs a graph node by node, so the plain core writes the whole score
    tensor (batch x heads x tokens²: 67 MB for 32 heads over 16x16 tokens at batch 8) to memory, then
    reads it back for Softmax and again for P·V. In groups, each group's scores stay in cache between
    the three ops. The grouping is fixed at export for the batch the graph is tuned for; any batch runs,
    with groups sized for that one. Results are identical (each head is computed alone either way).

    With `channels_first`, a UNet's spatial self-attention (`is_spatial_self_attention`) keeps its
    (batch, channels, height, width) layout, in one of two forms:
    - float projections: W·x on (batch, channels, tokens), each head a free reshape, and the transposed
      views the core needs folded by onnxruntime into its matmuls, instead of token-major copies of the
      input, Q, K, V and output (1.09-1.13x for a 32-head attention layer, docs/benchmarks/attention-blocks.md);
    - quantized projections (with output quantizers, as the onnxruntime-cpu profile gives them): 1x1
      convolutions, which onnxruntime runs as QLinearConv in its NHWC layout. Q and V are taken
      token-major from there (the permute cancels onnxruntime's own transpose back to NCHW), K stays
      channels-first (its NCHW form is the Kᵀ the scores need), and Q·Kᵀ becomes MatMulIntegerToFloat.
    """

    def __init__(self, batch: int, block_bytes: int = SCORE_BLOCK_BYTES, channels_first: bool = True) -> None:
        super().__init__()
        self.batch = batch
        self.block_bytes = block_bytes
        self.channels_first = channels_first

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        groups = self._groups(query, key, value, mask, query.shape[2], key.shape[2])
        return _concat_heads([ExplicitAttentionProcessor.attend(self, q, k, v, m, scale) for q, k, v, m in groups])

    def _groups(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        query_tokens: int,
        key_tokens: int,
    ) -> list[tuple]:
        """(query, key, value, mask) per head group: split along the heads, dim 1 in either layout."""
        heads = query.shape[1]
        group = heads_per_group(heads, self.batch, query_tokens, key_tokens, self.block_bytes)
        if group == heads:
            return [(query, key, value, mask)]
        masks = mask.split(group, 1) if mask is not None and mask.shape[1] == heads else [mask] * (heads // group)
        return list(zip(query.split(group, 1), key.split(group, 1), value.split(group, 1), masks))

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not (
            self.channels_first
            and is_spatial_self_attention(attn)
            and _projections_run_channels_first(attn)
            and hidden_states.ndim == 4
            and encoder_hidden_states is None
            and attention_mask is None
        ):
            return super().forward(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        x = attn.group_norm(hidden_states)
        core = self._integer_core if isinstance(attn.to_q, QuantizedLayer) else self._float_core
        out = attn.to_out[1](core(attn, x))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _float_core(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Projections and core on (batch, channels, tokens), through to the output projection."""
        batch, channels, height, width = x.shape
        tokens = height * width
        x = x.view(batch, channels, tokens)
        # (batch, heads, head_dim, tokens) by reshape; each group's core sees transposed views, which
        # onnxruntime folds into its MatMuls. Transposed after the split, not before: onnxruntime does not
        # move a Transpose through Split, so one before it stays a copy (3 Transposes left per layer, not 1)
        query, key, value = (
            _channels_first_linear(layer, x).view(batch, attn.heads, -1, tokens)
            for layer in (attn.to_q, attn.to_k, attn.to_v)
        )
        groups = self._groups(query, key, value, None, tokens, tokens)
        cores = [
            ExplicitAttentionProcessor.attend(self, *(t.transpose(-1, -2) for t in (q, k, v)), None, attn.scale)
            for q, k, v, _ in groups
        ]
        out = _concat_heads([core.transpose(-1, -2) for core in cores])
        return _channels_first_linear(attn.to_out[0], out.reshape(batch, channels, tokens)).view(
            batch, channels, height, width
        )

    def _integer_core(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Quantized projections as 1x1 convolutions around a core laid out for onnxruntime's NHWC QLinearConv."""
        batch, channels, height, width = x.shape
        tokens, heads = height * width, attn.heads

        def token_major(t: torch.Tensor) -> torch.Tensor:  # (batch, heads, tokens, head_dim)
            t = t.permute(0, 2, 3, 1).reshape(batch, tokens, heads, -1)
            return t.view(batch, 1, tokens, -1) if heads == 1 else t.transpose(1, 2)  # one head: no copy

        # q, k and v read the same input: quantized once when their input scales agree (as calibrated, they do),
        # so onnxruntime makes one QuantizeLinear and one NHWC copy of it instead of three
        first, *others = (layer.input_quantizer for layer in (attn.to_q, attn.to_k, attn.to_v))
        shared = all(q.grid == first.grid and torch.equal(q.scale, first.scale) for q in others)
        x = first(x) if shared else x
        query, value = (token_major(layer.pointwise(x, quantize_input=not shared)) for layer in (attn.to_q, attn.to_v))
        key = (
            attn.to_k.pointwise(x, quantize_input=not shared).view(batch, heads, -1, tokens).transpose(-1, -2)
        )  # attend() transposes it back
        groups = self._groups(query, key, value, None, tokens, tokens)
        out = _concat_heads(
            [ExplicitAttentionProcessor.attend(self, q, k, v, None, attn.scale) for q, k, v, _ in groups]
        )
        out = out.view(batch, tokens, channels) if heads == 1 else out.transpose(1, 2)
        out = out.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return attn.to_out[0].pointwise(out)


def _concat_heads(groups: list[torch.Tensor]) -> torch.Tensor:
    """The head groups side by side again (a single group is left as it is: a Concat would copy it)."""
    return groups[0] if len(groups) == 1 else torch.cat(groups, 1)


def _channels_first_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer` applied along dim 1 of a (batch, features, tokens) tensor."""
    y = torch.matmul(layer.weight, x)
    return y if layer.bias is None else y + layer.bias[:, None]


def is_spatial_self_attention(attn: nn.Module) -> bool:
    """A UNet block's self-attention over its own feature map (it brings its GroupNorm), with no
    cross-attention, spatial or q/k norms: the attention the channels-first path serves."""
    return (
        attn.group_norm is not None
        and not attn.is_cross_attention
        and attn.spatial_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
    )


def _projections_run_channels_first(attn: nn.Module) -> bool:
    """All four projections float Linear, or all quantized Linear with quantized outputs (1x1 QLinearConv)."""
    projections = (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])
    return all(type(layer) is nn.Linear for layer in projections) or all(
        type(layer) is QuantizedLayer and type(layer.layer) is nn.Linear and layer.output_quantizer is not None
        for layer in projections
    )


def group_attention_heads_(model: nn.Module, batch: int, block_bytes: int = SCORE_BLOCK_BYTES) -> int:
    """Give every diffusers Attention in `model` a head-grouped processor; return how many."""
    from diffusers.models.attention_processor import Attention

    layers = [module for module in model.modules() if isinstance(module, Attention)]
    for layer in layers:
        layer.set_processor(HeadGroupedAttentionProcessor(batch, block_bytes))
    return len(layers)
