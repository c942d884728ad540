"""The diffusers drop-in's cost per call: `stepquant.diffusers.from_bundle(B)` called as diffusers' pipelines call
`pipe.unet` (torch tensors in, a UNet2DConditionOutput out) against the same backend called directly on numpy
arrays, on demo-digits-sd's whole-pipeline bundle, at a guided batch of one image (2) and of eight (16).
Calls alternate between the two and the medians are compared, so drifts of a shared CPU hit both alike.

    python tools/bench_drop_in.py [--threads 2] [--calls 300] [--work DIR] [--smoke] [--no-write]
                                                                            (writes docs/benchmarks/drop-in.md)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from benchdoc import SMOKE_EXPORT, console, header, work_folder, write_section

from stepquant.bundle import load_bundle
from stepquant.diffusers import BundleUNet, from_bundle
from stepquant.runtime import quantized_backend


def export(out: Path, *options: str) -> Path:
    if not (out / "manifest.json").exists():
        prompts = out.with_name("prompts.txt")
        prompts.write_text("a red seven on a blue background\nthe digit 3 in green, yellow paper\n")
        console(
            "export-quantized",
            "--model",
            "demo-digits-sd",
            "--prompts-file",
            str(prompts),
            "--out",
            str(out),
            "--no-progress",
            *options,
        )
    return out


def medians(bundle: Path, batch: int, calls_count: int, threads: int) -> tuple[float, float]:
    """(direct, drop-in) median milliseconds per call."""
    loaded = load_bundle(bundle)
    direct, drop_in = quantized_backend(loaded, threads), from_bundle(loaded, threads=threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *loaded.manifest.sample_shape), dtype=np.float32)
    states = rng.standard_normal((batch, 20, 64), dtype=np.float32)
    t = np.full((batch,), 501.0, dtype=np.float32)
    x_torch, states_torch, t_torch = torch.from_numpy(x), torch.from_numpy(states), torch.tensor(501)
    times: dict[str, list[float]] = {"direct": [], "drop-in": []}
    calls = {
        "direct": lambda: direct(x, t, encoder_hidden_states=states),
        "drop-in": lambda: drop_in(x_torch, t_torch, encoder_hidden_states=states_torch, return_dict=False),
    }
    with torch.no_grad():
        for i in range(calls_count + 10):  # the first ten warm both up; the order alternates call by call
            for name in ("direct", "drop-in") if i % 2 else ("drop-in", "direct"):
                start = time.perf_counter()
                calls[name]()
                if i >= 10:
                    times[name].append(time.perf_counter() - start)
    return tuple(1e3 * float(np.median(times[k])) for k in ("direct", "drop-in"))


def fixed_cost(calls: int = 5000) -> float:
    """Microseconds the drop-in adds per call around a backend that does nothing (returns its input)."""
    unet = BundleUNet(lambda x, t, **conditions: x, {"_class_name": "UNet2DConditionModel", "in_channels": 4})
    x, states, t = torch.randn(2, 4, 8, 8), torch.randn(2, 20, 64), torch.tensor(501)
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(calls):
            unet(x, t, encoder_hidden_states=states, return_dict=False)
    return 1e6 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--work", type=Path, help="keep the bundle here (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="a quick export and few calls: checks the script runs")
    parser.add_argument("--no-write", action="store_true", help="print without updating its docs/benchmarks page")
    args = parser.parse_args()
    bundle = export(work_folder(args.work, "bench-drop-in-") / "bundle", *(SMOKE_EXPORT if args.smoke else ()))
    torch.set_num_threads(args.threads)
    calls = 20 if args.smoke else args.calls
    lines = [
        header(),
        f"demo-digits-sd bundle (default export), its quantized graph on onnxruntime's CPU provider, {args.threads} "
        "threads, "
        f"median of {calls} alternating calls.",
        "",
        "| batch | backend directly (ms) | drop-in (ms) | overhead |",
        "|---|---|---|---|",
    ]
    for batch in (2, 16):
        direct, drop_in = medians(bundle, batch, calls, args.threads)
        lines.append(f"| {batch} | {direct:.3f} | {drop_in:.3f} | {100 * (drop_in / direct - 1):+.1f}% |")
    lines += [
        "",
        f"Fixed cost of the drop-in around a backend that does nothing (batch 2): {fixed_cost():.0f} us per call; "
        "the rest of a row's difference is the machine's noise.",
    ]
    print("\n".join(lines))
    if not args.smoke and not args.no_write:
        write_section("diffusers drop-in", "\n".join(lines))


if __name__ == "__main__":
    main()
