"""Head-grouped attention on onnxruntime's CPU provider: one 32-head attention layer (256 channels in
heads of dimension 8, UNet2DModel's default `attention_head_dim`, over 16x16 = 256 tokens; the
google/ddpm-cifar10-32 UNet itself has one 256-wide head, where grouping changes nothing),
exported with the score block sizes of `HeadGroupedAttentionProcessor` from "no grouping" down to one
head per group, channels-first (the default) and token-major (diffusers' layout), timed at batch 1
and 8 with 2 threads. Sessions alternate call by call with thread
spinning off (a spinning idle session would steal the cores of the next one), so a slow spell of the
machine hits every block size alike. This is what chose `SCORE_BLOCK_BYTES` and the channels-first layout.

    python tools/bench_attention_blocks.py [--calls 30] [--no-write] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from benchdoc import header, parse_options, write_section
from diffusers.models.attention_processor import Attention

from stepquant.quant.attention_processors import SCORE_BLOCK_BYTES, HeadGroupedAttentionProcessor, heads_per_group

CHANNELS, HEADS, SIZE, TUNED_BATCH = 256, 32, 16, 8
BLOCKS_MIB = (1024, 16, 8, 4, 2)  # 1024: one group (plain attention); 2: one head per group at batch 8
# (score block MiB, channels-first); the first one, diffusers' own layout in one group, is the reference
SETTINGS = [(1024, False), (8, False)] + [(block, True) for block in BLOCKS_MIB]


def export_layer(block_mib: int, channels_first: bool, path: Path) -> int:
    torch.manual_seed(0)
    layer = Attention(
        CHANNELS, heads=HEADS, dim_head=CHANNELS // HEADS, norm_num_groups=32, residual_connection=True, bias=True
    ).eval()
    layer.set_processor(HeadGroupedAttentionProcessor(TUNED_BATCH, block_mib * 2**20, channels_first))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            layer,
            (torch.randn(2, CHANNELS, SIZE, SIZE),),
            str(path),
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    return heads_per_group(HEADS, TUNED_BATCH, SIZE * SIZE, SIZE * SIZE, block_mib * 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--no-write", action="store_true")
    args = parse_options(parser, calls=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rows = [
        "| batch | layout | score block | heads per group | median ms | vs token-major, one group |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        sessions, groups = {}, {}
        for setting in SETTINGS:
            path = Path(tmp) / f"attention-{setting[0]}-{setting[1]}.onnx"
            groups[setting] = export_layer(*setting, path)
            sessions[setting] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for batch in (1, 8):
            feed = {"x": np.random.default_rng(0).standard_normal((batch, CHANNELS, SIZE, SIZE), dtype=np.float32)}
            reference = sessions[SETTINGS[0]].run(None, feed)[0]
            times: dict[tuple, list[float]] = {setting: [] for setting in sessions}
            for call in range(3 + args.calls):
                for setting, session in sessions.items():
                    begin = time.perf_counter()
                    out = session.run(None, feed)[0]
                    if call >= 3:
                        times[setting].append(1000 * (time.perf_counter() - begin))
                    if call == 0:
                        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5)  # same values in any setting
            plain = statistics.median(times[SETTINGS[0]])
            for (block, channels_first), median in ((s, statistics.median(t)) for s, t in times.items()):
                label = "none" if block == BLOCKS_MIB[0] else f"{block} MiB"
                default = channels_first and block * 2**20 == SCORE_BLOCK_BYTES
                layout = "channels-first" if channels_first else "token-major"
                rows.append(
                    f"| {batch} | {layout} | {label}{' (default)' if default else ''} | "
                    f"{groups[(block, channels_first)]} | "
                    f"{median:.2f} | {plain / median:.2f}x |"
                )
                print(rows[-1], flush=True)
    body = (
        header()
        + f"\nOne attention layer ({HEADS} heads of dimension {CHANNELS // HEADS}, {SIZE * SIZE} tokens), groups "
        f"sized for batch {TUNED_BATCH}, onnxruntime {ort.__version__}, 2 intra-op threads without spinning, median of "
        f"{args.calls} calls per setting, settings alternating call by call.\n\n" + "\n".join(rows) + "\n"
    )
    if not args.no_write:
        write_section("bench_attention_blocks", body)


if __name__ == "__main__":
    main()
