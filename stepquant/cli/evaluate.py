"""`stepquant eval` (quality against FP from the same noise) and `stepquant bench` (latency)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from stepquant.bundle import load_bundle
from stepquant.cli.choices import OptimizationLevel, RuntimeBackend, Scheduler
from stepquant.cli.options import TrustKey
from stepquant.eval.evaluate import evaluate, plot_corrections, plot_errors
from stepquant.eval.latency import measure_latency
from stepquant.runtime import OnnxRuntimeBackend, SamplerConfig
from stepquant.runtime.bundle_backends import bundle_corrections, quantized_backend, reference_backend

MAX_EVAL_SAMPLES = 16384  # the metrics hold every sample and its features at once


def eval_command(
    bundle: Annotated[Path, typer.Option(help="Bundle to evaluate (its Q/DQ graph against its FP graph, both on onnxruntime).")],
    n: Annotated[int, typer.Option(min=2, max=MAX_EVAL_SAMPLES, help="Number of seeds (0 .. n-1); at least 2, for "
                                   "Fréchet distances' covariance; every sample is held for the metrics.")] = 1024,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Sampler steps (default: the bundle's).")] = None,
    eta: Annotated[Optional[float], typer.Option(help="DDIM eta (default: the bundle's).")] = None,
    scheduler: Annotated[Optional[Scheduler], typer.Option(help="Sampler (default: the bundle's; another one is captured "
                                                                  "from the bundle's noise schedule).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Directory for eval.json and errors.png (default: BUNDLE-eval).")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="onnxruntime intra-op threads.")] = None,
    backend: Annotated[RuntimeBackend, typer.Option(help="What runs the bundle's Q/DQ graph.")] = RuntimeBackend.onnxruntime,
    engine: Annotated[Optional[Path], typer.Option(help="TensorRT engine for --backend tensorrt (default: the bundle's).")] = None,
    corrections: Annotated[bool, typer.Option(help="Apply the bundle's per-timestep correction terms, if it has them.")] = True,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    trust_key: TrustKey = None,
) -> None:
    """Quality of a bundle against FP from the same noise: PSNR, Fréchet distances, classifier, error per step."""
    loaded = load_bundle(bundle, trust_key)
    if loaded.manifest.conditions:
        raise ValueError("stepquant eval scores digit samples (the demo's classifier and pixel-space metrics); this bundle is "
                         "a conditional latent model: its manifest holds latent PSNR to FP, and `stepquant sample` runs it")
    exported = loaded.manifest.sampler
    config = SamplerConfig(scheduler.value if scheduler else exported.scheduler, steps or exported.steps,
                           exported.eta if eta is None else eta)
    terms = bundle_corrections(loaded) if corrections else None
    result = evaluate(reference_backend(loaded, threads), quantized_backend(loaded, threads, backend.value, engine),
                      loaded.manifest.noise_schedule, range(n), loaded.manifest.sample_shape, config, progress=progress,
                      corrections=terms)
    out = out or bundle.with_name(bundle.name + "-eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"bundle": str(bundle), "sampler": asdict(config), **result.to_dict()}, indent=2))
    plot_errors(result, out / "errors.png", title=f"{bundle.name}: {n} samples, {config.steps} steps, eta {config.eta:g}")
    rows = [("PSNR to FP (dB, mean / min)", f"{result.psnr_to_fp_db:.2f} / {result.psnr_to_fp_db_min:.2f}"),
            ("FD to FP", f"{result.fd_to_fp:.3f}"),
            ("FD to data (quantized / FP)", f"{result.fd_to_data:.3f} / {result.fp_fd_to_data:.3f}"),
            ("label agreement with FP", f"{result.label_agreement:.3f}"),
            ("confidence (quantized / FP)", f"{result.confidence:.3f} / {result.fp_confidence:.3f}"),
            ("recognisable (quantized / FP)", f"{result.recognisable:.3f} / {result.fp_recognisable:.3f}"),
            ("final accumulated / mean per-step error", f"{result.accumulated_error[-1]:.4f} / {np.mean(result.step_error):.4f}")]
    width = max(len(label) for label, _ in rows)
    print(f"{bundle} on {backend.value}, corrections {terms.method if terms else 'none'}: {n} samples, {config.steps} {config.scheduler.upper()} steps, eta {config.eta:g}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    print(f"wrote {out / 'eval.json'} and {out / 'errors.png'}")


def inspect_command(
    bundle: Annotated[Path, typer.Option(help="Bundle whose correction terms to show.")],
    plot: Annotated[Optional[Path], typer.Option(help="PNG of the terms per step (default: BUNDLE-corrections.png).")] = None,
    trust_key: TrustKey = None,
) -> None:
    """Print the bundle's per-timestep correction terms and plot them."""
    terms = bundle_corrections(load_bundle(bundle, trust_key))
    if terms is None:
        print(f"{bundle}: exported without correction terms (--correction none)")
        return
    print(f"{bundle}: {terms.method} correction terms for {len(terms.timesteps)} timesteps")
    print(f"  {'timestep':>8}  {'gain':>8}  {'bias':>9}  {'noise std':>9}  {'resid var':>9}  {'input bias':>10}")
    for i, t in enumerate(terms.timesteps.tolist()):
        print(f"  {t:8d}  {float(terms.gain[i].mean()):8.4f}  {float(terms.bias[i].mean()):9.2e}  "
              f"{float(terms.noise_std[i]):9.2e}  {float(terms.residual_var[i]):9.2e}  {float(terms.input_bias[i].mean()):10.2e}")
    plot = plot or bundle.with_name(bundle.name + "-corrections.png")
    plot_corrections(terms, plot)
    print(f"wrote {plot}")


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
    graphs = {"onnxruntime FP32": OnnxRuntimeBackend(loaded.file(manifest.reference_graph), threads,
                                                     optimization_level=optimization_level.value, cache_dir=cache_dir)}
    for name, target in manifest.targets.items():
        graphs[f"{name} graph"] = OnnxRuntimeBackend(loaded.file(target.graphs[0]), threads,
                                                     optimization_level=optimization_level.value, cache_dir=cache_dir)
    print(f"{bundle}: {threads} intra-op threads, optimisation level {optimization_level.value}, median of at least 10 calls after 3 warm-up calls"
          + (" (first graph of each target's timestep groups)" if any(len(t.graphs) > 1 for t in manifest.targets.values()) else ""))
    for size in batch or [1, 8]:
        if size < 1:
            raise typer.BadParameter("must be at least 1", param_hint="--batch")
        sequence = manifest.shape_profile.get("sequence")
        results = {label: measure_latency(backend, manifest.sample_shape, size, manifest.conditions, sequence and sequence["opt"])
                   for label, backend in graphs.items()}
        fp_ms = results["onnxruntime FP32"].median_ms
        for label, result in results.items():
            print(f"  batch {size:<3} {label:<22} {result.median_ms:9.2f} ms  {result.images_per_second:9.1f} images/s  "
                  f"{fp_ms / result.median_ms:5.2f}x vs FP32")
