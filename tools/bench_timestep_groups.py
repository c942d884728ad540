"""Timestep groups against the single merged scale set on the demo model (minmax calibration, onnxruntime):
PSNR/FD to FP, the bundle's size on disk and the time to load its graphs into onnxruntime sessions.

    python tools/bench_timestep_groups.py [--n 256] [--bits W4A8,W4A4] [--no-write] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchdoc import SMOKE_EXPORT, SMOKE_STEPS, export_here, header, parse_options, write_section

from stepquant.bundle import load_bundle
from stepquant.eval.evaluate import evaluate
from stepquant.runtime import SamplerConfig
from stepquant.runtime.bundle_backends import quantized_backend, reference_backend

GROUPINGS = {
    "1 (merged)": [],
    "2 groups": ["--timestep-groups", "2"],
    "4 groups": ["--timestep-groups", "4"],
    "every 5 steps (5 graphs)": ["--steps-per-group", "5"],
}


def load_seconds(bundle, repeats: int = 5) -> float:
    """Median time to open every graph of the bundle as an onnxruntime session."""
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        quantized_backend(bundle, threads=2)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--bits", default="W4A8,W4A4")
    parser.add_argument("--no-write", action="store_true")
    args = parse_options(parser, n=4, bits="W4A8")
    quick = SMOKE_EXPORT if args.smoke else ()
    torch.set_num_threads(2)
    start = time.perf_counter()
    groupings = dict(list(GROUPINGS.items())[:2]) if args.smoke else GROUPINGS  # a smoke run's 4 steps: 1 and 2 groups
    sampler = (
        SamplerConfig(steps=SMOKE_STEPS) if args.smoke else SamplerConfig()
    )  # the steps the bundles are exported for
    lines = [
        f"{args.n} seeds, {sampler.steps} DDIM steps (eta 0), minmax calibration, 64 trajectories; bundles "
        "on onnxruntime. Size: all Q/DQ graphs of the bundle; load: median of 5 openings of all its sessions.",
        "",
        "| bits | groups | PSNR to FP (dB) | FD to FP | agreement | graphs (MB) | load (ms) | group boundaries "
        "(timesteps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits.split(","):
            weight_bits, act_bits = bits[1], bits[3]
            for label, extra in groupings.items():
                out = Path(tmp) / f"{bits}-{len(extra)}-{label[:1]}"
                export_here(
                    "--out",
                    out,
                    "--weight-bits",
                    weight_bits,
                    "--act-bits",
                    act_bits,
                    "--eval-samples",
                    "2",
                    "--allow-parity-failure",
                    "--no-progress",
                    *extra,
                    *quick,
                )
                bundle = load_bundle(out)
                groups = bundle.target("tensorrt").timestep_groups
                result = evaluate(
                    reference_backend(bundle, threads=2),
                    quantized_backend(bundle, threads=2),
                    bundle.manifest.noise_schedule,
                    range(args.n),
                    bundle.manifest.sample_shape,
                    sampler,
                    progress=False,
                )
                size = sum((out / g.graph).stat().st_size for g in groups) / 1e6
                spans = (
                    ", ".join(f"{g.timesteps[0]:.0f}-{g.timesteps[-1]:.0f}" for g in groups)
                    if len(groups) > 1
                    else "all"
                )
                lines.append(
                    f"| {bits} | {label} | {result.psnr_to_fp_db:.2f} | {result.fd_to_fp:.3f} | "
                    f"{result.label_agreement:.3f} | "
                    f"{size:.2f} | {1000 * load_seconds(bundle):.0f} | {spans} |"
                )
                print(lines[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    text = "\n".join(lines)
    if not args.no_write:
        write_section(
            "bench_timestep_groups", header() + f"Total wall time {time.perf_counter() - start:.0f} s.\n\n" + text
        )


if __name__ == "__main__":
    main()
