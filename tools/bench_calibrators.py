"""Calibrators side by side on the demo model at W4A8 and W4A4, with modelopt's max calibration from the
same calibration data: PSNR/FD to FP, classifier agreement, calibration wall time and peak memory.
Each stepquant bundle is exported by `export-quantized` in a fresh process (so its peak memory is its
own) and executed on onnxruntime; modelopt runs as its own torch fake-quant model. Also the peak memory
of the multi-step objective for n = 1, 2, 4, 8 (constant-memory gradient against the unrolled chain),
and the per-step against accumulated error plot of minmax and the best calibrator at W4A8.

    python tools/bench_calibrators.py            (about 40 min on 2 cores)
    python tools/bench_calibrators.py --memory-only
    python tools/bench_calibrators.py --smoke    (a quick check that it runs; writes nothing)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_quality import Context, leave_out, modelopt_method
from benchdoc import PAGES, SMOKE_EXPORT, header, parse_options, write_section

from stepquant.bundle import load_bundle
from stepquant.calibrators import collect_calibration_set
from stepquant.calibrators.calibrate import CALIBRATORS
from stepquant.eval.evaluate import evaluate
from stepquant.eval.plots import plot_errors
from stepquant.export.onnx_export import export_onnx
from stepquant.models import DEMO_MODEL_NAME, EpsilonModel, load_model
from stepquant.models.torch_backend import TorchBackend
from stepquant.pipeline import CALIBRATION_SEED_OFFSET
from stepquant.runtime import OnnxRuntimeBackend, SamplerConfig
from stepquant.runtime.bundle_backends import quantized_backend

SETTINGS = {"W4A8": (4, 8), "W4A4": (4, 4)}
MEMORY_STEPS = (1, 2, 4, 8)


def memory_child(steps: int, unrolled: bool, batch: int, iters: int) -> None:
    """Peak resident memory added by running the multi-step objective (printed as JSON)."""
    import copy

    from stepquant.calibrators.multistep import multistep_objective
    from stepquant.calibrators.ranges import calibrate_ranges
    from stepquant.models.schedulers import capture_table
    from stepquant.quant import QuantSpec, quantize_

    torch.set_num_threads(2)
    loaded = load_model(DEMO_MODEL_NAME)
    fp = EpsilonModel(loaded.denoiser).eval()
    sampler = SamplerConfig()
    calib = collect_calibration_set(
        TorchBackend(fp),
        loaded.scheduler_config,
        range(CALIBRATION_SEED_OFFSET, CALIBRATION_SEED_OFFSET + 16),
        (1, 16, 16),
        sampler,
        sampler.steps,
        progress=False,
    )
    q = copy.deepcopy(fp)
    quantize_(q, QuantSpec(4, 8))
    calibrate_ranges(q, calib, progress=False)
    for layer in q.modules():
        if hasattr(layer, "weight_quantizer"):
            layer.weight_quantizer.learn_rounding(layer.layer.weight)
    objective = multistep_objective(
        fp,
        q,
        calib,
        capture_table(sampler, loaded.scheduler_config),
        steps,
        batch,
        torch.Generator().manual_seed(0),
        unrolled,
    )
    objective(0)  # allocator warm-up at the same shapes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    begin = time.perf_counter()
    for it in range(iters):
        objective(it)
    print(
        json.dumps(
            {
                "steps": steps,
                "unrolled": unrolled,
                "added_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "seconds_per_iteration": (time.perf_counter() - begin) / iters,
            }
        )
    )


def memory_table(batch: int, iters: int, steps_list: list[int]) -> str:
    lines = [
        f"Multi-step objective at W4A8 with learned rounding, batch {batch}, {iters} iterations after one warm-up "
        "iteration; each cell a fresh process. Added = peak RSS growth during the iterations.",
        "",
        "| n (steps) | gradient | peak RSS (MiB) | added (MiB) | s / iteration |",
        "|---|---|---|---|---|",
    ]
    for unrolled in (False, True):
        for steps in steps_list:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(steps), str(int(unrolled)), str(batch), str(iters)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            label = "unrolled chain (naive)" if unrolled else "per-step recomputation (stepquant)"
            lines.append(
                f"| {steps} | {label} | {r['peak_mib']:.0f} | {r['added_mib']:.0f} | {r['seconds_per_iteration']:.2f} |"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="evaluation seeds")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calibrators", default=",".join(CALIBRATORS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument(
        "--memory-steps", default=",".join(map(str, MEMORY_STEPS)), help="the objective's n, comma-separated"
    )
    parser.add_argument("--memory-child", nargs=4, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parse_options(parser, n=4, calib_samples=4, calibrators="minmax", settings="W4A8", memory_steps="1")
    if args.memory_child:
        steps, unrolled, batch, iters = args.memory_child
        memory_child(steps, bool(unrolled), batch, iters)
        return
    start = time.perf_counter()
    memory = memory_table(32, 1 if args.smoke else 3, [int(n) for n in args.memory_steps.split(",")])
    if args.memory_only:
        if not args.no_write:
            write_section("bench_calibrators_memory", header() + "\n" + memory)
        return
    torch.set_num_threads(2)
    loaded = load_model(DEMO_MODEL_NAME)
    shape = (1, 16, 16)
    sampler = SamplerConfig()
    fp_model = EpsilonModel(loaded.denoiser)
    seeds = range(CALIBRATION_SEED_OFFSET, CALIBRATION_SEED_OFFSET + args.calib_samples)
    calib = collect_calibration_set(
        TorchBackend(fp_model), loaded.scheduler_config, seeds, shape, sampler, sampler.steps, progress=False
    )
    lines = [
        f"{args.n} seeds, {sampler.steps} DDIM steps (eta 0), {args.calib_samples} calibration trajectories "
        f"({len(calib)} inputs). conv_in/conv_out and the embeddings stay FP (modelopt's default exclusions), "
        "so 'first and last layer at 8 bits' holds a fortiori. Calibration time and peak memory are from the "
        "bundle's manifest (fresh process: model load, FP trajectories, calibration). Agreement: share of samples "
        "the digit classifier labels as it labels the FP sample from the same seed.",
        "",
        "| bits | method | PSNR to FP (dB) | FD to FP | agreement | recognisable (FP) | calibration (s) | peak RSS "
        "(MiB) | Q/DQ parity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    evaluations = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        export_onnx(fp_model, workdir / "fp32.onnx", shape)
        fp_backend = OnnxRuntimeBackend(workdir / "fp32.onnx", threads=2)
        ctx = Context(
            fp_model, loaded.scheduler_config, shape, calib, workdir / "fp32.onnx", workdir, args.calib_samples, sampler
        )

        def row(bits, method, result, seconds, peak, parity):
            lines.append(
                f"| {bits} | {method} | {result.psnr_to_fp_db:.2f} | {result.fd_to_fp:.3f} | "
                f"{result.label_agreement:.3f} | "
                f"{result.recognisable:.3f} ({result.fp_recognisable:.3f}) | {seconds:.0f} | {peak} | {parity} |"
            )
            print(lines[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)

        for bits in args.settings.split(","):
            weight_bits, act_bits = SETTINGS[bits]
            if not leave_out("modelopt max", args.smoke):
                backend, seconds, _ = modelopt_method(bits)(ctx)
                result = evaluate(
                    fp_backend, backend, loaded.scheduler_config, range(args.n), shape, sampler, progress=False
                )
                row(bits, "modelopt max (INT8_DEFAULT_CFG at these bits)", result, seconds, "-", "-")
            for calibrator in args.calibrators.split(","):
                out = workdir / f"{bits}-{calibrator}"
                subprocess.run(
                    [
                        "export-quantized",
                        "--out",
                        str(out),
                        "--weight-bits",
                        str(weight_bits),
                        "--act-bits",
                        str(act_bits),
                        "--calibrator",
                        calibrator,
                        "--calib-samples",
                        str(args.calib_samples),
                        "--eval-samples",
                        "2",
                        "--allow-parity-failure",
                        "--no-progress",
                        *(SMOKE_EXPORT[:2] if args.smoke else ()),
                    ],
                    check=True,
                    capture_output=True,
                )
                bundle = load_bundle(out)
                result = evaluate(
                    fp_backend,
                    quantized_backend(bundle, threads=2),
                    loaded.scheduler_config,
                    range(args.n),
                    shape,
                    sampler,
                    progress=False,
                )
                evaluations[(bits, calibrator)] = result
                calibration = bundle.manifest.info["calibration"]
                parity = bundle.target("tensorrt").parity
                row(
                    bits,
                    f"stepquant {calibrator}",
                    result,
                    calibration["seconds"],
                    f"{calibration['peak_rss_mib']:.0f}",
                    f"{'pass' if parity['passed'] else 'FAIL'} "
                    f"({max(t['median_reldiff'] for t in parity['end_to_end']['timesteps']):.1e})",
                )
    text = "\n".join(lines)
    plot = ""
    if ("W4A8", "minmax") in evaluations and not args.no_write:
        images = PAGES.parent / "images"
        images.mkdir(exist_ok=True)
        best = max((c for b, c in evaluations if b == "W4A8"), key=lambda c: evaluations[("W4A8", c)].psnr_to_fp_db)
        for calibrator in dict.fromkeys(("minmax", best)):
            plot_errors(
                evaluations[("W4A8", calibrator)],
                images / f"errors_w4a8_{calibrator}.png",
                f"W4A8 {calibrator}: {args.n} samples, onnxruntime",
            )
        plot = (
            f"\n\nPer-step against accumulated error at W4A8 (AccuQuant's figure on our model): "
            f"![minmax](../images/errors_w4a8_minmax.png) ![{best}](../images/errors_w4a8_{best}.png)\n"
        )
        for calibrator in dict.fromkeys(("minmax", best)):
            e = evaluations[("W4A8", calibrator)]
            plot += (
                f"\n- {calibrator}: per-step RMS error first/last step {e.step_error[0]:.4f} / {e.step_error[-1]:.4f}, "
                f"accumulated {e.accumulated_error[0]:.4f} / {e.accumulated_error[-1]:.4f}."
            )
    print(text + plot)
    if not args.no_write:
        write_section(
            "bench_calibrators", header() + f"Total wall time {time.perf_counter() - start:.0f} s.\n\n" + text + plot
        )
        write_section("bench_calibrators_memory", header() + "\n" + memory)


if __name__ == "__main__":
    main()
