"""Per-timestep correction terms on the demo model, side by side with modelopt and onnxruntime's
quantize_static from the same run: each correction (and none) at W8A8 and W4A8, for one eta.
Everything is executed on onnxruntime except modelopt (its own torch fake-quant model), and judged by
`stepquant.eval.evaluate` against the FP graph from the same seeds. Also the host-loop cost of corrections.

    python tools/bench_corrections.py --eta 0 && python tools/bench_corrections.py --eta 1   [--smoke: a quick check]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_quality import Context, Row, leave_out, modelopt_method, ort_static_method
from benchdoc import header, parse_options, write_section

from stepquant.bundle import load_bundle
from stepquant.calibrators import collect_calibration_set
from stepquant.eval.evaluate import evaluate
from stepquant.eval.latency import TimedBackend
from stepquant.export.config import CalibrationConfig, ChecksConfig, CorrectionConfig
from stepquant.export.onnx_export import export_onnx
from stepquant.models import DEMO_MODEL_NAME, EpsilonModel, load_model
from stepquant.models.schedulers import capture_table
from stepquant.models.torch_backend import TorchBackend
from stepquant.pipeline import CALIBRATION_SEED_OFFSET, ExportConfig, export_quantized
from stepquant.quant import QuantSpec
from stepquant.runtime import OnnxRuntimeBackend, SamplerConfig, sample
from stepquant.runtime.bundle_backends import bundle_corrections, quantized_backend
from stepquant.runtime.corrections import METHODS

BITS = {"W8A8": (8, 8), "W4A8": (4, 8)}


def host_overhead(bundle_path: Path, sampler: SamplerConfig, repeats: int = 5) -> str:
    """Host-loop time per step with and without the bundle's corrections (median of `repeats` runs),
    against the network's time per step."""
    import statistics

    bundle = load_bundle(bundle_path)
    terms = bundle_corrections(bundle)
    backend = TimedBackend(quantized_backend(bundle, threads=2))
    host = {"without": [], "with": []}
    network = []
    for _ in range(repeats):
        for label, corrections in (("without", None), ("with", terms)):
            backend.seconds = 0.0
            begin = time.perf_counter()
            sample(
                backend,
                capture_table(sampler, bundle.manifest.noise_schedule),
                range(8),
                bundle.manifest.sample_shape,
                sampler,
                batch_size=8,
                progress=False,
                corrections=corrections,
            )
            host[label].append((time.perf_counter() - begin - backend.seconds) / sampler.steps)
            network.append(backend.seconds / sampler.steps)
    extra = statistics.median(host["with"]) - statistics.median(host["without"])
    step = statistics.median(network) + statistics.median(host["with"])
    return (
        f"Host-loop cost of {terms.method} corrections, batch 8, {sampler.steps} DDIM steps (eta {sampler.eta:g}), "
        f"median of {repeats} runs: {1000 * extra:.3f} ms per step more than the uncorrected loop, "
        f"{100 * extra / step:.2f}% of a step ({1000 * step:.2f} ms: network {1000 * statistics.median(network):.2f} "
        "ms)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--bits", default=",".join(BITS), help="comma-separated, of " + ", ".join(BITS))
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="corrections, comma-separated, of " + ", ".join(METHODS)
    )
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--overhead-only", action="store_true", help="only export one W4A8 ptqd bundle and time the host loop"
    )
    args = parse_options(parser, n=4, steps=4, calib_samples=4, bits="W4A8", methods="none,ptqd")
    with_modelopt = not leave_out("modelopt (max)", args.smoke)  # before the calibration
    torch.set_num_threads(2)
    start = time.perf_counter()
    loaded = load_model(DEMO_MODEL_NAME)
    shape = (1, 16, 16)
    sampler = SamplerConfig("ddim", args.steps, args.eta)
    fp_model = EpsilonModel(loaded.denoiser)
    seeds = range(CALIBRATION_SEED_OFFSET, CALIBRATION_SEED_OFFSET + args.calib_samples)
    calib = collect_calibration_set(
        TorchBackend(fp_model), loaded.scheduler_config, seeds, shape, sampler, args.steps, progress=False
    )
    rows: list[Row] = []
    overhead = ""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        export_onnx(fp_model, workdir / "fp32.onnx", shape)
        ctx = Context(
            fp_model, loaded.scheduler_config, shape, calib, workdir / "fp32.onnx", workdir, args.calib_samples, sampler
        )
        fp_backend = OnnxRuntimeBackend(ctx.fp_onnx, threads=2)
        if args.overhead_only:
            export_quantized(
                ExportConfig(
                    out=workdir / "W4A8-ptqd",
                    quant=QuantSpec(4, 8),
                    sampler=sampler,
                    progress=False,
                    calibration=CalibrationConfig(samples=args.calib_samples),
                    checks=ChecksConfig(eval_samples=2, require_parity=False),
                    correction=CorrectionConfig(method="ptqd"),
                )
            )
            print(host_overhead(workdir / "W4A8-ptqd", sampler))
            return

        def judge(name, bits, backend, seconds, executed_by, corrections=None):
            result = evaluate(
                fp_backend,
                backend,
                loaded.scheduler_config,
                range(args.n),
                shape,
                sampler,
                progress=False,
                corrections=corrections,
            )
            rows.append(Row(name, bits, executed_by, seconds, result))
            print(
                f"{name:36} {bits}  PSNR {result.psnr_to_fp_db:6.2f} dB  FD-to-FP {result.fd_to_fp:7.3f}  "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

        for bits in args.bits.split(","):
            weight_bits, act_bits = BITS[bits]
            for method in args.methods.split(","):
                out = workdir / f"{bits}-{method}"
                begin = time.perf_counter()
                export_quantized(
                    ExportConfig(
                        out=out,
                        quant=QuantSpec(weight_bits, act_bits),
                        sampler=sampler,
                        progress=False,
                        calibration=CalibrationConfig(samples=args.calib_samples),
                        checks=ChecksConfig(eval_samples=2, require_parity=False),
                        correction=CorrectionConfig(method=method),
                    )
                )
                bundle = load_bundle(out)
                judge(
                    f"stepquant, correction {method}",
                    bits,
                    quantized_backend(bundle, threads=2),
                    time.perf_counter() - begin,
                    "onnxruntime",
                    bundle_corrections(bundle),
                )
            if with_modelopt:
                judge("modelopt (max)", bits, *modelopt_method(bits)(ctx))
        judge("ORT quantize_static (MinMax)", "W8A8", *ort_static_method("MinMax")(ctx))
        overhead = (
            host_overhead(workdir / "W4A8-ptqd", sampler) if (workdir / "W4A8-ptqd").exists() else ""
        )  # W4A8 ptqd asked
    lines = [
        f"{args.n} seeds, {args.steps} DDIM steps, eta {args.eta:g}; calibration (s) includes estimating the terms.",
        "",
        "| method | bits | PSNR to FP (dB) | FD to FP | FD to data | agreement | recognisable | calibration (s) | "
        "executed by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r.result
        lines.append(
            f"| {r.method} | {r.bits} | {e.psnr_to_fp_db:.2f} | {e.fd_to_fp:.3f} | {e.fd_to_data:.2f} | "
            f"{e.label_agreement:.3f} | {e.recognisable:.3f} | {r.calibration_seconds:.1f} | {r.executed_by} |"
        )
    text = "\n".join(lines) + f"\n\n{overhead}\n"
    print(text)
    if not args.no_write:
        write_section(
            f"bench_corrections_eta{args.eta:g}",
            header() + f"Total wall time {time.perf_counter() - start:.0f} s.\n\n" + text,
        )


if __name__ == "__main__":
    main()
