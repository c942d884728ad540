"""Speed on the CPU: per-forward median latency and images/s of onnxruntime FP32, stepquant's INT8 graphs
(onnxruntime-cpu profile and tensorrt profile), onnxruntime's own `quantize_static` in three
configurations, torch eager FP32, and FP32 with the CPU profile's attention (head groups, channels-first; to separate
what that restructuring gives from what INT8 gives), at batch 1 and 8 with 2 threads, on the demo model and on a
UNet2DModel with the architecture of google/ddpm-cifar10-32 (random weights, built from its config).
Every quantized graph of a model is calibrated on the same inputs: the demo's on FP sampling trajectories
as `export-quantized` collects them, so each demo graph's PSNR to FP (256 seeds, 25 DDIM steps, as the
bundle's) stands beside its speed; the random-weight cifar10 UNet's on noise (speed only). Also session
start-up with and without the optimised-graph cache, onnxruntime's per-operator profile of the CPU-profile
graph, the calibration wall time and peak memory of `export-quantized`, and the sampler's host-loop time.

    python tools/bench_latency.py [--threads 2] [--models demo,cifar10] [--no-write] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from benchdoc import SMOKE_EXPORT, header, parse_options, write_section
from diffusers import UNet2DModel
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

from stepquant.bundle import load_bundle
from stepquant.calibrators import calibrate_ranges, collect_calibration_set
from stepquant.calibrators.data import CalibrationSet
from stepquant.eval.evaluate import evaluate
from stepquant.eval.latency import TimedBackend, measure_latency
from stepquant.export.fusion import check_integer_convs
from stepquant.export.lint import check_conformance
from stepquant.export.onnx_export import export_onnx
from stepquant.export.shapes import ShapeProfile
from stepquant.export.targets import for_target
from stepquant.models import DEMO_MODEL_NAME, EpsilonModel, load_model
from stepquant.models.reference_configs import DDPM_CIFAR10_UNET
from stepquant.models.schedulers import capture_table
from stepquant.models.torch_backend import TorchBackend
from stepquant.pipeline import CALIBRATION_SEED_OFFSET
from stepquant.quant import QuantSpec, quantize_
from stepquant.quant.attention_processors import group_attention_heads_
from stepquant.runtime import OnnxRuntimeBackend, SamplerConfig, sample
from stepquant.runtime.bundle_backends import quantized_backend

DEMO_SAMPLER = SamplerConfig("ddim", 25, 0.0)


@dataclass(frozen=True)
class Effort:
    """How long to measure. Interleaved rounds per batch size, each a short block per backend: this machine has
    slow spells of seconds to minutes that slow every graph (the INT8 ones most), so many short rounds, with each
    speed-up taken within its round, beat a few long ones. The demo's calibration and quality settings are
    export-quantized's defaults (64 trajectories, 256 seeds, 25 DDIM steps)."""

    rounds: int = 7
    min_runs: int = 5
    min_seconds: float = 1.0
    trajectories: int = 64
    quality_seeds: int = 256
    export_options: tuple[str, ...] = ()


FULL, SMOKE = (
    Effort(),
    Effort(rounds=1, min_runs=1, min_seconds=0.05, trajectories=4, quality_seeds=4, export_options=SMOKE_EXPORT),
)

# onnxruntime's quantize_static, as its docs suggest for CPU (U8S8), and the TensorRT-style S8S8 setting
QUANTIZE_STATIC = {
    "U8S8 all ops": dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=None),
    "S8S8 Conv/Gemm/MatMul": dict(
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "Gemm", "MatMul"]
    ),
    "U8S8 Conv only": dict(
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"]
    ),
}


def build_models(name: str):
    if name == "demo":
        unet = load_model(DEMO_MODEL_NAME).denoiser
    else:
        torch.manual_seed(0)
        unet = UNet2DModel(**DDPM_CIFAR10_UNET).eval().requires_grad_(False)
    return unet, (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)


def calibration_inputs(name: str, unet, shape, trajectories: int) -> CalibrationSet:
    """The demo: FP trajectories, as export-quantized collects them; the random-weight cifar10 UNet, whose
    outputs mean nothing: noise at several timesteps."""
    if name == "demo":
        seeds = range(CALIBRATION_SEED_OFFSET, CALIBRATION_SEED_OFFSET + trajectories)
        return collect_calibration_set(
            TorchBackend(EpsilonModel(unet)),
            load_model(DEMO_MODEL_NAME).scheduler_config,
            seeds,
            shape,
            DEMO_SAMPLER,
            DEMO_SAMPLER.steps,
            progress=False,
        )
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([999.0, 750.0, 500.0, 250.0, 0.0]).repeat_interleave(4)
    return CalibrationSet(torch.randn((len(timesteps), *shape), generator=generator), timesteps)


def stepquant_graphs(
    unet, shape, data: CalibrationSet, workdir: Path, name: str, spec: QuantSpec = QuantSpec()
) -> dict[str, Path]:
    """W8A8 graphs of both target profiles from one range calibration."""
    model = EpsilonModel(copy.deepcopy(unet))
    quantize_(model, spec)
    calibrate_ranges(model, data, batch_size=4, progress=False)
    paths = {"tensorrt": workdir / f"{name}-qdq.onnx", "onnxruntime-cpu": workdir / f"{name}-cpu.onnx"}
    export_onnx(model, paths["tensorrt"], shape)
    check_conformance(paths["tensorrt"])
    cpu = for_target(model, "onnxruntime-cpu")
    calibrate_ranges(cpu, data, batch_size=4, progress=False, only_uncalibrated=True)
    export_onnx(cpu, paths["onnxruntime-cpu"], shape)
    print(name, "onnxruntime-cpu integer kernels:", check_integer_convs(paths["onnxruntime-cpu"], cpu), flush=True)
    return paths


class _Reader(CalibrationDataReader):
    def __init__(self, data: CalibrationSet) -> None:
        self.feeds = iter([{"sample": s.numpy(), "timestep": t.numpy()} for s, t in data.batches(4)])

    def get_next(self):
        return next(self.feeds, None)


def quantize_static_graphs(fp32: Path, data: CalibrationSet, workdir: Path, name: str) -> dict[str, Path]:
    """onnxruntime's own static quantization of the FP32 graph (QDQ format, per-channel weights, MinMax)."""
    prepared = workdir / f"{name}-fp32-prep.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    paths = {}
    for label, options in QUANTIZE_STATIC.items():
        paths[label] = workdir / f"{name}-ort-{label.replace(' ', '_').replace('/', '-')}.onnx"
        quantize_static(
            str(prepared), str(paths[label]), _Reader(data), quant_format=QuantFormat.QDQ, per_channel=True, **options
        )
    return paths


def startup_ms(path: Path, threads: int, cache: Path | None) -> float:
    begin = time.perf_counter()
    OnnxRuntimeBackend(path, threads, cache_dir=cache)
    return 1000 * (time.perf_counter() - begin)


def operator_profile(path: Path, shape, batch: int, threads: int, workdir: Path, top: int = 8) -> str:
    """Share of the run time per operator type, from onnxruntime's profiler (10 runs after warm-up)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / "profile")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {
        "sample": np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32),
        "timestep": np.full((batch,), 500.0, np.float32),
    }
    for _ in range(13):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values())
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{op} {100 * us / total:.0f}%" for op, us in ranked)


def latency_rows(name: str, threads: int, workdir: Path, effort: Effort) -> tuple[list[str], list[str]]:
    unet, shape = build_models(name)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    data = calibration_inputs(name, unet, shape, effort.trajectories)
    fp32 = workdir / f"{name}-fp32.onnx"
    export_onnx(EpsilonModel(unet), fp32, shape)
    # FP32 with the attention restructured as the onnxruntime-cpu profile has it: how much of that
    # profile's speed-up comes from restructuring the attention rather than from INT8
    grouped = EpsilonModel(copy.deepcopy(unet))
    group_attention_heads_(grouped, batch=ShapeProfile.batch.opt)  # as for_target sizes them
    fp32_grouped = workdir / f"{name}-fp32-grouped.onnx"
    export_onnx(grouped, fp32_grouped, shape)
    ours = stepquant_graphs(unet, shape, data, workdir, name)
    # every Conv/Linear quantized, as quantize_static does (no modelopt-style exclusions of conv_in/out, shortcuts)
    unexcluded = stepquant_graphs(unet, shape, data, workdir, f"{name}-all", QuantSpec(exclude=()))
    peers = quantize_static_graphs(fp32, data, workdir, name)
    torch.set_num_threads(threads)
    backends = {
        "onnxruntime FP32": OnnxRuntimeBackend(fp32, threads),
        "onnxruntime FP32, CPU profile attention": OnnxRuntimeBackend(fp32_grouped, threads),
        "stepquant INT8, onnxruntime-cpu profile": OnnxRuntimeBackend(ours["onnxruntime-cpu"], threads),
        "stepquant INT8, onnxruntime-cpu profile, no exclusions": OnnxRuntimeBackend(
            unexcluded["onnxruntime-cpu"], threads
        ),
        "stepquant INT8, tensorrt profile": OnnxRuntimeBackend(ours["tensorrt"], threads),
        **{f"quantize_static {label}": OnnxRuntimeBackend(path, threads) for label, path in peers.items()},
        "torch eager FP32": TorchBackend(EpsilonModel(unet)),
    }
    quality = demo_quality(backends, shape, effort.quality_seeds) if name == "demo" else {}
    rows = []
    for batch in (1, 8):
        # rounds interleave the backends, so a slow spell of the shared machine hits all of them alike;
        # the speed-up is taken within each round, against that round's FP32 time
        rounds = [
            {
                label: measure_latency(backend, shape, batch, min_runs=effort.min_runs, min_seconds=effort.min_seconds)
                for label, backend in backends.items()
            }
            for _ in range(effort.rounds)
        ]
        for label in backends:
            medians = [r[label].median_ms for r in rounds]
            speedups = [r["onnxruntime FP32"].median_ms / r[label].median_ms for r in rounds]
            median_ms = statistics.median(medians)
            rows.append(
                f"| {name} ({params:.1f}M) | {batch} | {label} | {median_ms:.2f} | "
                f"{' / '.join(f'{m:.1f}' for m in medians)} | {1000 * batch / median_ms:.1f} | "
                f"{statistics.median(speedups):.2f}x ({min(speedups):.2f}-{max(speedups):.2f}) | "
                f"{f'{quality[label]:.2f}' if label in quality else '-'} |"
            )
            print(rows[-1], flush=True)
    cache = workdir / f"{name}-cache"
    cold, _, warm = (startup_ms(ours["onnxruntime-cpu"], threads, c) for c in (None, cache, cache))
    notes = [
        f"{name}: session start-up of the onnxruntime-cpu graph {cold:.0f} ms, {warm:.0f} ms from the optimised-graph "
        f"cache (`OnnxRuntimeBackend(..., cache_dir=...)`); FP32 graph {startup_ms(fp32, threads, None):.0f} ms.",
        f"{name}, batch 8, onnxruntime profiler, share of kernel time: FP32: "
        f"{operator_profile(fp32, shape, 8, threads, workdir)}; onnxruntime-cpu profile: "
        f"{operator_profile(ours['onnxruntime-cpu'], shape, 8, threads, workdir)}.",
    ]
    for note in notes:
        print(note, flush=True)
    return rows, notes


def demo_quality(backends: dict, shape, seeds: int) -> dict[str, float]:
    """PSNR to the FP32 graph (dB, mean over seeds) of every INT8 graph, sampled from the same noise."""
    schedule = load_model(DEMO_MODEL_NAME).scheduler_config
    fp = backends["onnxruntime FP32"]
    return {
        label: evaluate(fp, backend, schedule, range(seeds), shape, DEMO_SAMPLER, progress=False).psnr_to_fp_db
        for label, backend in backends.items()
        if "INT8" in label or "quantize_static" in label
    }


def calibration_cost(workdir: Path, export_options: tuple[str, ...]) -> str:
    """Run export-quantized on the demo model in a child process: wall time, calibration time, peak RSS."""
    out = workdir / "bundle"
    command = [
        str(Path(sys.executable).parent / "export-quantized"),
        "--out",
        str(out),
        "--eval-samples",
        "8",
        "--no-progress",
        *export_options,
    ]
    begin = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - begin
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    calibration = load_bundle(out).manifest.info["calibration"]
    return (
        f"`export-quantized --eval-samples 8` on the demo model (defaults: {calibration['trajectories']} trajectories, "
        f"{calibration['inputs']} calibration inputs, max observer): wall {wall:.1f} s, of which model load + "
        f"FP trajectories + range calibration {calibration['seconds']:.1f} s; peak RSS {peak_mib:.0f} MiB."
    )


def host_loop_cost(workdir: Path, threads: int) -> str:
    bundle = load_bundle(workdir / "bundle")
    lines = []
    for batch in (1, 8):
        backend = TimedBackend(quantized_backend(bundle, threads))
        config = SamplerConfig("ddim", 25, 1.0)
        begin = time.perf_counter()
        sample(
            backend,
            capture_table(config, bundle.manifest.noise_schedule),
            range(batch),
            bundle.manifest.sample_shape,
            config,
            batch_size=batch,
            progress=False,
        )
        total = time.perf_counter() - begin
        host_ms = 1000 * (total - backend.seconds) / backend.calls
        network_ms = 1000 * backend.seconds / backend.calls
        lines.append(
            f"batch {batch}: host loop {host_ms:.3f} ms per step (scheduler step, per-sample noise, "
            f"tensor conversion) against {network_ms:.2f} ms per network call ({100 * host_ms / network_ms:.1f}%)"
        )
    return "Sampler host loop on the demo bundle (DDIM eta 1, 25 steps, onnxruntime): " + "; ".join(lines) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="demo,cifar10")
    parser.add_argument("--no-write", action="store_true")
    args = parse_options(parser, models="demo")
    effort = SMOKE if args.smoke else FULL
    rows = [
        f"| model | batch | backend | median ms | medians of the {effort.rounds} rounds (ms) | images/s | "
        "speed vs onnxruntime FP32 (median of rounds, range) | PSNR to FP (dB, demo) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.models.split(","):
            model_rows, model_notes = latency_rows(name, args.threads, workdir, effort)
            rows += model_rows
            notes += model_notes
        cost = calibration_cost(workdir, effort.export_options)
        loop = host_loop_cost(workdir, args.threads)
    print(cost)
    print(loop)
    body = (
        header() + f"\nSession options: {args.threads} intra-op threads (torch.set_num_threads for torch), graph "
        f"optimisation level ORT_ENABLE_ALL, onnxruntime {ort.__version__}, CPUExecutionProvider; median of at least "
        f"{effort.min_runs} timed calls (and {effort.min_seconds:g} s) after 3 warm-up calls, in {effort.rounds} "
        "rounds that interleave the backends. All INT8 graphs are W8A8 "
        f"with per-channel weights, calibrated (MinMax) on the same inputs: the demo's on {effort.trajectories} FP "
        "trajectories "
        f"({DEMO_SAMPLER.steps} DDIM steps), its PSNR to FP over {effort.quality_seeds} seeds; the cifar10 UNet's on "
        "20 noise inputs.\n\n" + "\n".join(rows) + "\n\n" + "\n\n".join(notes) + f"\n\n{cost}\n\n{loop}\n"
    )
    if not args.no_write:
        write_section("bench_latency", body)


if __name__ == "__main__":
    main()
