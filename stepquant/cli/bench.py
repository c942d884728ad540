"""`stepquant bench`: per-forward latency of a bundle's graphs on the CPU backends installed (runtime only: it runs on
the device)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stepquant.bundle import load_bundle
from stepquant.cli.choices import OptimizationLevel
from stepquant.cli.options import TrustKey
from stepquant.eval.latency import measure_latency
from stepquant.runtime import OnnxRuntimeBackend
from stepquant.runtime.bundle_backends import ENGINES, RunOptions

CPU_BACKENDS = ("onnxruntime", "openvino")


def bench_command(
    bundle: Annotated[Path, typer.Option(help="Bundle whose graphs to time.")],
    batch: Annotated[Optional[list[int]], typer.Option(help="Batch size (repeatable; default 1 and 8).")] = None,
    backend: Annotated[
        Optional[list[str]],
        typer.Option(help="CPU backend to time, onnxruntime or openvino (repeatable; default: each one installed)."),
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="Intra-op threads.")] = 2,
    seconds: Annotated[
        float, typer.Option(min=0.0, help="Least time spent timing each graph at each batch size.")
    ] = 3.0,
    optimization_level: Annotated[
        OptimizationLevel, typer.Option(help="onnxruntime graph optimisation level.")
    ] = OptimizationLevel.all,
    cache_dir: Annotated[
        Optional[Path],
        typer.Option(
            help="Keep onnxruntime's optimised graphs here and reuse them (faster start-up; valid on this machine "
            "only)."
        ),
    ] = None,
    trust_key: TrustKey = None,
) -> None:
    """Per-forward latency of the bundle's FP32 graph and of each quantized graph (one per target profile) on each
    CPU backend, with the ratio to OpenVINO FP32 (where installed) and to onnxruntime FP32."""
    loaded = load_bundle(bundle, trust_key)
    manifest = loaded.manifest
    sizes = batch or [1, 8]
    limits = manifest.shape_profile.get("batch", {})
    low, high = limits.get("min", 1), limits.get("max")
    for size in sizes:
        if size < low or (high is not None and size > high):
            raise typer.BadParameter(
                f"batch {size} is outside the bundle's batch range {low}..{high} (its graphs' shape profile)",
                param_hint="--batch",
            )
    unknown = [name for name in backend or [] if name not in CPU_BACKENDS]
    if unknown:
        raise typer.BadParameter(
            f"{unknown[0]!r} is not a CPU backend; choose from {', '.join(CPU_BACKENDS)}", param_hint="--backend"
        )
    backends = backend or [name for name in CPU_BACKENDS if ENGINES[name].available(loaded, RunOptions())]
    files = {
        "FP32": manifest.reference_graph,
        **{f"{name} graph": target.graphs[0] for name, target in manifest.targets.items()},
    }
    graphs = {}
    for name in backends:
        if name == "onnxruntime":
            for label, graph in files.items():
                graphs[f"onnxruntime {label}"] = OnnxRuntimeBackend(
                    loaded.file(graph), threads, optimization_level=optimization_level.value, cache_dir=cache_dir
                )
        else:
            graphs.update(
                {
                    f"{name} {label}": ENGINES[name].open(loaded.file(graph), RunOptions(threads), "all")
                    for label, graph in files.items()
                }
            )
    print(
        f"{bundle}: {threads} intra-op threads, onnxruntime optimisation level {optimization_level.value}, median of "
        "at least "
        f"10 calls and {seconds:g} s after 3 warm-up calls"
        + (
            " (first graph of each target's timestep groups)"
            if any(len(t.graphs) > 1 for t in manifest.targets.values())
            else ""
        )
    )
    baselines = [label for label in ("openvino FP32", "onnxruntime FP32") if label in graphs]
    for size in sizes:
        sequence = manifest.shape_profile.get("sequence")
        results = {
            label: measure_latency(
                runner,
                manifest.sample_shape,
                size,
                manifest.conditions,
                sequence and sequence["opt"],
                min_seconds=seconds,
            )
            for label, runner in graphs.items()
        }
        for label, result in results.items():
            ratios = "  ".join(f"{results[base].median_ms / result.median_ms:5.2f}x vs {base}" for base in baselines)
            print(
                f"  batch {size:<3} {label:<30} {result.median_ms:9.2f} ms  {result.images_per_second:9.1f} images/s  "
                f"{ratios}"
            )
