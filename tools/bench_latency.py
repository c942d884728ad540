"""Speed on the CPU: per-forward median latency and images/s of onnxruntime FP32, onnxruntime with
stepquant's Q/DQ graph, and torch eager FP32, at batch 1 and 8 with 2 threads, on the demo model and on a
UNet2DModel with the architecture of google/ddpm-cifar10-32 (random weights, built from its config).
Also the calibration wall time and peak memory of `export-quantized`, and the sampler's host-loop time.

    python tools/bench_latency.py [--threads 2] [--models demo,cifar10]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchdoc import header, write_section
from diffusers import UNet2DModel

from stepquant.calibrators import calibrate_ranges
from stepquant.calibrators.data import CalibrationSet
from stepquant.eval.latency import TimedBackend, measure_latency
from stepquant.export import export_onnx, load_bundle
from stepquant.export.lint import check_conformance
from stepquant.models import DEMO_MODEL_NAME, EpsilonModel, load_model
from stepquant.models.reference_configs import DDPM_CIFAR10_UNET
from stepquant.quant import QuantSpec, quantize_
from stepquant.runtime import OnnxRuntimeBackend, SamplerConfig, TorchBackend, sample
from stepquant.runtime.bundle_backends import quantized_backend


def build_models(name: str):
    if name == "demo":
        unet = load_model(DEMO_MODEL_NAME).unet
    else:
        torch.manual_seed(0)
        unet = UNet2DModel(**DDPM_CIFAR10_UNET).eval().requires_grad_(False)
    return unet, (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)


def quantized_graph(unet, shape, path: Path) -> None:
    """W8A8 Q/DQ graph calibrated on inputs noised to several timesteps (for speed only; quality is
    measured by bench_quality.py on the trained demo model)."""
    import copy

    model = EpsilonModel(copy.deepcopy(unet))
    quantize_(model, QuantSpec())
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.tensor([999.0, 750.0, 500.0, 250.0, 0.0]).repeat_interleave(4)
    calibrate_ranges(model, CalibrationSet(torch.randn((len(timesteps), *shape), generator=generator), timesteps),
                     batch_size=4, progress=False)
    export_onnx(model, path, shape)
    check_conformance(path)


def latency_rows(name: str, threads: int, workdir: Path) -> list[str]:
    unet, shape = build_models(name)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    export_onnx(EpsilonModel(unet), workdir / f"{name}-fp32.onnx", shape)
    quantized_graph(unet, shape, workdir / f"{name}-qdq.onnx")
    torch.set_num_threads(threads)
    backends = {
        "onnxruntime FP32": OnnxRuntimeBackend(workdir / f"{name}-fp32.onnx", threads),
        "onnxruntime INT8 Q/DQ (tensorrt profile)": OnnxRuntimeBackend(workdir / f"{name}-qdq.onnx", threads),
        "torch eager FP32": TorchBackend(EpsilonModel(unet)),
    }
    rows = []
    for batch in (1, 8):
        reference = None
        for label, backend in backends.items():
            result = measure_latency(backend, shape, batch)
            reference = reference or result.median_ms
            rows.append(f"| {name} ({params:.1f}M) | {batch} | {label} | {result.median_ms:.2f} | {result.p90_ms:.2f} | "
                        f"{result.images_per_second:.1f} | {reference / result.median_ms:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def calibration_cost(workdir: Path) -> str:
    """Run export-quantized on the demo model in a child process: wall time, calibration time, peak RSS."""
    out = workdir / "bundle"
    command = [str(Path(sys.executable).parent / "export-quantized"), "--out", str(out), "--eval-samples", "8", "--no-progress"]
    begin = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - begin
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    calibration = load_bundle(out).manifest["calibration"]
    return (f"`export-quantized --eval-samples 8` on the demo model (defaults: {calibration['trajectories']} trajectories, "
            f"{calibration['inputs']} calibration inputs, max observer): wall {wall:.1f} s, of which model load + "
            f"FP trajectories + range calibration {calibration['seconds']:.1f} s; peak RSS {peak_mib:.0f} MiB.")


def host_loop_cost(workdir: Path, threads: int) -> str:
    bundle = load_bundle(workdir / "bundle")
    lines = []
    for batch in (1, 8):
        backend = TimedBackend(quantized_backend(bundle, threads))
        config = SamplerConfig("ddim", 25, 1.0)
        begin = time.perf_counter()
        sample(backend, bundle.manifest["noise_schedule"], range(batch), bundle.sample_shape, config, batch_size=batch, progress=False)
        total = time.perf_counter() - begin
        host_ms = 1000 * (total - backend.seconds) / backend.calls
        network_ms = 1000 * backend.seconds / backend.calls
        lines.append(f"batch {batch}: host loop {host_ms:.3f} ms per step (scheduler step, per-sample noise, "
                     f"tensor conversion) against {network_ms:.2f} ms per network call ({100 * host_ms / network_ms:.1f}%)")
    return "Sampler host loop on the demo bundle (DDIM eta 1, 25 steps, onnxruntime): " + "; ".join(lines) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="demo,cifar10")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = ["| model | batch | backend | median ms | p90 ms | images/s | speed vs onnxruntime FP32 |",
            "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.models.split(","):
            rows += latency_rows(name, args.threads, workdir)
        cost = calibration_cost(workdir)
        loop = host_loop_cost(workdir, args.threads)
    print(cost)
    print(loop)
    body = (header() + f"\n{args.threads} threads (onnxruntime intra-op threads, torch.set_num_threads); median of at "
            "least 10 timed calls after 3 warm-up calls.\n\n" + "\n".join(rows) + f"\n\n{cost}\n\n{loop}\n")
    if not args.no_write:
        write_section("bench_latency", body)


if __name__ == "__main__":
    main()
