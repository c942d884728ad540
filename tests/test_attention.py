"""Explicit and head-grouped attention compute what diffusers' own processor does, and the grouped one
exports as one Softmax per head group (what keeps each group's scores in cache on onnxruntime's CPU)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import needs_exact_integer_kernels
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from stepquant.export.fusion import optimized_op_counts
from stepquant.quant import QuantizedLayer, QuantSpec
from stepquant.quant.attention_processors import (
    ExplicitAttentionProcessor,
    HeadGroupedAttentionProcessor,
    group_attention_heads_,
    heads_per_group,
)
from stepquant.quant.grid import IntGrid
from stepquant.quant.layers import ActivationQuantizer


def test_heads_per_group_fits_the_score_block():
    # 32 heads (UNet2DModel's default head dimension 8 at 256 channels) over 16x16 = 256 tokens;
    # 2 MiB of scores per head at batch 8
    assert heads_per_group(32, batch=8, query_tokens=256, key_tokens=256, block_bytes=8 * 2**20) == 4
    assert heads_per_group(32, batch=1, query_tokens=256, key_tokens=256, block_bytes=8 * 2**20) == 32
    assert heads_per_group(6, batch=8, query_tokens=256, key_tokens=256, block_bytes=5 * 2**20) == 2  # a divisor
    assert heads_per_group(8, batch=64, query_tokens=4096, key_tokens=4096, block_bytes=2**20) == 1  # never 0


def _attention(cross: bool) -> Attention:
    torch.manual_seed(0)
    return Attention(
        32,
        heads=4,
        dim_head=8,
        cross_attention_dim=12 if cross else None,
        norm_num_groups=None if cross else 8,
        residual_connection=not cross,
        bias=True,
    ).eval()


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize(
    "processor",
    [
        ExplicitAttentionProcessor(),
        HeadGroupedAttentionProcessor(batch=2, block_bytes=1),
        HeadGroupedAttentionProcessor(batch=2, block_bytes=1, channels_first=False),
    ],
    ids=["explicit", "one-head-groups", "one-head-groups-token-major"],
)
def test_processors_match_diffusers_attention(cross, processor):
    reference = _attention(cross)
    reference.set_processor(AttnProcessor2_0())
    ours = copy.deepcopy(reference)
    ours.set_processor(processor)
    if cross:  # text tokens with a padding mask, as diffusers' UNets pass it: an additive bias
        hidden, context = torch.randn(2, 9, 32), torch.randn(2, 5, 12)
        mask = (1 - torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])) * -10000.0
        args, kwargs = (hidden,), dict(encoder_hidden_states=context, attention_mask=mask)
    else:  # the spatial self-attention of a UNet block
        args, kwargs = (torch.randn(2, 32, 3, 4),), {}
    with torch.no_grad():
        torch.testing.assert_close(ours(*args, **kwargs), reference(*args, **kwargs), rtol=1e-5, atol=1e-5)


def _export(layer: Attention, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes that the group size is fixed at export: it is meant to be
        torch.onnx.export(
            layer,
            (torch.randn(2, 32, 3, 4),),
            str(path),
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )


def test_grouped_attention_exports_one_softmax_per_group_and_runs_on_onnxruntime(tmp_path):
    layer = _attention(cross=False)
    plain = copy.deepcopy(layer)
    assert group_attention_heads_(layer, batch=2, block_bytes=2 * 12 * 12 * 4 * 2) == 1  # 2 heads per group
    path = tmp_path / "attention.onnx"
    _export(layer, path)
    assert sum(node.op_type == "Softmax" for node in onnx.load(str(path)).graph.node) == 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2, 5):  # groups are sized for batch 2; every batch still runs
        x = torch.randn(batch, 32, 3, 4)
        with torch.no_grad():
            expected = plain(x).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, rtol=1e-5, atol=1e-5)


def test_channels_first_spatial_attention_leaves_onnxruntime_no_token_major_copies(tmp_path):
    """Token-major, onnxruntime copies the input, Q, K, V and the output through Transposes; channels-first,
    it folds what transposes the core needs into its MatMuls (at most one Transpose is left, on the output)."""
    counts = {}
    for channels_first in (True, False):
        layer = _attention(cross=False)
        layer.set_processor(
            HeadGroupedAttentionProcessor(batch=2, block_bytes=2 * 12 * 12 * 4 * 2, channels_first=channels_first)
        )
        _export(layer, tmp_path / f"{channels_first}.onnx")
        counts[channels_first] = optimized_op_counts(tmp_path / f"{channels_first}.onnx")["Transpose"]
    assert counts[True] <= 1 < counts[False]


def _quantized_projections(layer: Attention, x: torch.Tensor) -> Attention:
    """`layer` with its q/k/v/out projections fake-quantized as the onnxruntime-cpu profile has them
    (UINT8-stored activations, quantized outputs), ranges taken from one float pass over `x`."""
    amax = {}
    projections = {"to_q": layer.to_q, "to_k": layer.to_k, "to_v": layer.to_v, "to_out": layer.to_out[0]}
    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: amax.update({name: (i[0].abs().max(), o.abs().max())}))
        for name, module in projections.items()
    ]
    with torch.no_grad():
        layer(x)
    for hook in hooks:
        hook.remove()
    grid = IntGrid(8, narrow=False, unsigned_storage=True)
    for name, linear in projections.items():
        quantized = QuantizedLayer(linear, QuantSpec().weight_grid, grid)
        quantized.output_quantizer = ActivationQuantizer(grid)
        quantized.input_quantizer.set_amax(amax[name][0])
        quantized.output_quantizer.set_amax(amax[name][1])
        if name == "to_out":
            layer.to_out[0] = quantized
        else:
            setattr(layer, name, quantized)
    return layer


def _quantized_attention_graph(tmp_path):
    """The quantized channels-first attention layer, its token-major twin, their outputs and the exported graph."""
    x = torch.randn(2, 32, 3, 4)
    layer = _quantized_projections(_attention(cross=False), x)
    token_major = copy.deepcopy(layer)
    layer.set_processor(HeadGroupedAttentionProcessor(batch=2))
    token_major.set_processor(HeadGroupedAttentionProcessor(batch=2, channels_first=False))
    with torch.no_grad():
        ours, reference = layer(x), token_major(x)
    path = tmp_path / "attention.onnx"
    _export(layer, path)
    return x, ours, reference, float(layer.to_out[0].output_quantizer.scale), path


def test_quantized_projections_run_as_qlinearconv_and_match_the_token_major_simulation(tmp_path):
    """Channels-first, quantized projections are 1x1 convolutions onnxruntime fuses into QLinearConv (the
    shared input quantized once), Q·Kᵀ becomes an integer matmul, and the values are those of diffusers'
    token-major layout with the same fake-quant layers (up to a rare output rounding tie); the graph as
    written (onnxruntime's optimisations off) computes them too."""
    x, ours, reference, step, path = _quantized_attention_graph(tmp_path)
    assert (ours - reference).abs().max() <= step * 1.001 and (ours - reference).abs().gt(1e-5).float().mean() < 0.01
    counts = optimized_op_counts(path)
    assert counts["QLinearConv"] == 4 and counts["MatMulIntegerToFloat"] == 1 and counts["QuantizeLinear"] == 2
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    as_written = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(as_written.run(None, {"x": x.numpy()})[0], ours.numpy(), atol=3 * step)


@needs_exact_integer_kernels
def test_the_fused_integer_attention_matches_the_simulation(tmp_path):
    x, ours, _, step, path = _quantized_attention_graph(tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], ours.numpy(), atol=3 * step)
