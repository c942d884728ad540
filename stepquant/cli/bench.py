"""`stepquant bench`: per-forward latency of a bundle's graphs on onnxruntime (runtime only: it runs on the device)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stepquant.bundle import load_bundle
from stepquant.cli.choices import OptimizationLevel
from stepquant.cli.options import TrustKey
from stepquant.eval.latency import measure_latency
from stepquant.runtime import OnnxRuntimeBackend


def bench_command(
    bundle: Annotated[Path, typer.Option(help="Bundle whose graphs to time.")],
    batch: Annotated[Optional[list[int]], typer.Option(help="Batch size (repeatable; default 1 and 8).")] = None,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime intra-op threads.")] = 2,
    optimization_level: Annotated[OptimizationLevel, typer.Option(help="onnxruntime graph optimisation level.")] = OptimizationLevel.all,
    cache_dir: Annotated[Optional[Path], typer.Option(
        help="Keep onnxruntime's optimised graphs here and reuse them (faster start-up; valid on this machine only).")] = None,
    trust_key: TrustKey = None,
) -> None:
    """Per-forward latency of each of the bundle's quantized graphs (one per target profile) against its FP32 graph on onnxruntime."""
    loaded = load_bundle(bundle, trust_key)
    manifest = loaded.manifest
    sizes = batch or [1, 8]
    limits = manifest.shape_profile.get("batch", {})
    low, high = limits.get("min", 1), limits.get("max")
    for size in sizes:
        if size < low or (high is not None and size > high):
            raise typer.BadParameter(f"batch {size} is outside the bundle's batch range {low}..{high} (its graphs' shape "
                                     "profile)", param_hint="--batch")
    graphs = {"onnxruntime FP32": OnnxRuntimeBackend(loaded.file(manifest.reference_graph), threads,
                                                     optimization_level=optimization_level.value, cache_dir=cache_dir)}
    for name, target in manifest.targets.items():
        graphs[f"{name} graph"] = OnnxRuntimeBackend(loaded.file(target.graphs[0]), threads,
                                                     optimization_level=optimization_level.value, cache_dir=cache_dir)
    print(f"{bundle}: {threads} intra-op threads, optimisation level {optimization_level.value}, median of at least 10 calls after 3 warm-up calls"
          + (" (first graph of each target's timestep groups)" if any(len(t.graphs) > 1 for t in manifest.targets.values()) else ""))
    for size in sizes:
        sequence = manifest.shape_profile.get("sequence")
        results = {label: measure_latency(backend, manifest.sample_shape, size, manifest.conditions, sequence and sequence["opt"])
                   for label, backend in graphs.items()}
        fp_ms = results["onnxruntime FP32"].median_ms
        for label, result in results.items():
            print(f"  batch {size:<3} {label:<22} {result.median_ms:9.2f} ms  {result.images_per_second:9.1f} images/s  "
                  f"{fp_ms / result.median_ms:5.2f}x vs FP32")
