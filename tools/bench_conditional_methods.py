"""Every calibrator, with and without the best correction, on the trained class-conditional demo
(`demo-digits-cond`) sampled with classifier-free guidance, against modelopt's max calibration of the same
model fed the same guided calibration loop (both halves of every guided call).

First the corrections are compared after `reconstruct` (at W4A8 unless `--compare-at`; under the first sampler
asked for), each estimated on the guided estimate and per branch (both halves pooled); the best of them is "the
best correction" of the table. Then per sampler (25 DDIM steps, 20 DPM-Solver++ steps) and bit width, modelopt
and every calibrator. Each stepquant bundle is exported in-process and its Q/DQ graph run on onnxruntime; FP is
the bundle's FP32 graph. The calibrators that unroll DDIM steps (multistep, mixed-order) are calibrated on DDIM
trajectories of the same guidance and evaluated under each sampler. Seeds 0..n-1; seed i asks for digit i mod 10.

    python tools/bench_conditional_methods.py                       (the whole table: hours on 2 cores)
    python tools/bench_conditional_methods.py --bits W4A8,W4A4 --schedulers ddim --calibrators minmax,reconstruct
    python tools/bench_conditional_methods.py --bits W4A8 --schedulers dpm-solver++ --calibrators reconstruct \
        --calibrate-on ddim --correction d2-deterministic   (a DDIM-calibrated bundle sampled with DPM-Solver++)
    python tools/bench_conditional_methods.py --smoke              (a quick check that it runs; writes nothing)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_quality import BITS, leave_out, modelopt_max
from benchdoc import header, page, parse_options, publish

from stepquant.bundle import load_bundle
from stepquant.calibrators import collect_calibration_set
from stepquant.calibrators.calibrate import CALIBRATORS, RECONSTRUCTION_CALIBRATORS, TRAJECTORY_CALIBRATORS
from stepquant.calibrators.corrections import estimate_corrections
from stepquant.calibrators.reconstruction import ReconstructionConfig
from stepquant.eval.evaluate import Evaluation, evaluate
from stepquant.export.config import CalibrationConfig, ChecksConfig
from stepquant.models import EpsilonModel, load_model
from stepquant.models.conditioning import load_conditioning
from stepquant.models.denoisers import sample_shape
from stepquant.models.loading import CONDITIONAL_DEMO_NAME
from stepquant.models.torch_backend import TorchBackend
from stepquant.pipeline import CALIBRATION_SEED_OFFSET, ExportConfig, export_quantized
from stepquant.quant import QuantSpec
from stepquant.runtime import SamplerConfig
from stepquant.runtime.bundle_backends import quantized_backend, reference_backend
from stepquant.runtime.corrections import METHODS

GUIDANCE = 3.0
SAMPLERS = {
    "ddim": SamplerConfig("ddim", 25, 0.0, GUIDANCE),
    "dpm-solver++": SamplerConfig("dpm-solver++", 20, 0.0, GUIDANCE),
}
CORRECTIONS = [m for m in METHODS if m != "none"]
HEADER = (
    "| sampler | bits | method | correction | PSNR to FP (dB) | FD to FP | class accuracy (FP) | recognisable (FP) | "
    "calibration (s) |",
    "|---|---|---|---|---|---|---|---|---|",
)


def cells(result: Evaluation) -> str:
    return (
        f"{result.psnr_to_fp_db:.2f} | {result.fd_to_fp:.3f} | {result.class_accuracy:.3f} "
        f"({result.fp_class_accuracy:.3f}) | "
        f"{result.recognisable:.3f} ({result.fp_recognisable:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="evaluation seeds (seed i asks for digit i mod 10)")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument(
        "--recon-iters", type=int, default=ReconstructionConfig.iters, help="reconstruction iterations per block"
    )
    parser.add_argument("--bits", default=",".join(BITS))
    parser.add_argument("--schedulers", default=",".join(SAMPLERS))
    parser.add_argument("--calibrators", default=",".join(CALIBRATORS))
    parser.add_argument(
        "--correction",
        help="skip the comparison of corrections and use this one, e.g. d2-deterministic or tac:per-branch",
    )
    parser.add_argument(
        "--compare-at",
        default="W4A8",
        choices=list(BITS),
        help="bit width of the `reconstruct` bundle on which the corrections are compared (without --correction)",
    )
    parser.add_argument(
        "--calibrate-on",
        choices=list(SAMPLERS),
        help="calibrate every bundle on this sampler's "
        "trajectories (default: the evaluated one's; multistep and mixed-order always take DDIM's)",
    )
    parser.add_argument(
        "--no-modelopt",
        action="store_true",
        help="leave out modelopt max (when another section already has this sampler and width's row)",
    )
    parser.add_argument("--section", default="", help="suffix of the benchmark page's section (runs of other subsets)")
    parser.add_argument("--no-write", action="store_true")
    args = parse_options(
        parser,
        n=4,
        calib_samples=4,
        recon_iters=2,
        bits="W4A8",
        schedulers="ddim",
        calibrators="minmax",
        correction="ptqd",
    )
    args.no_modelopt = args.no_modelopt or leave_out("modelopt max", args.smoke)
    torch.set_num_threads(2)
    start = time.perf_counter()
    loaded = load_model(CONDITIONAL_DEMO_NAME)
    fp_model = EpsilonModel(loaded.denoiser)
    shape = sample_shape(loaded.denoiser)
    rows = load_conditioning(fp_model, loaded, None, None, shape)  # every digit in turn
    requested = [i % len(rows) for i in range(args.n)]
    calib_seeds = range(CALIBRATION_SEED_OFFSET, CALIBRATION_SEED_OFFSET + args.calib_samples)
    schedule = loaded.scheduler_config
    lines = [
        f"demo-digits-cond, guidance {GUIDANCE:g}, {args.n} seeds over the ten digits, {args.calib_samples} "
        "calibration "
        "trajectories (guided: both halves of every call are calibration inputs). Class accuracy: share the digit "
        "classifier reads as the requested digit (FP's in brackets); recognisable: classifier confidence >= 0.9.",
        "",
    ]
    table = list(HEADER)
    choice = [
        "| correction | estimated on | PSNR to FP (dB) | FD to FP | class accuracy (FP) |",
        "|---|---|---|---|---|",
    ]

    def row(sampler: str, bits: str, method: str, correction: str, result: Evaluation, seconds: float) -> None:
        table.append(f"| {sampler} | {bits} | {method} | {correction} | {cells(result)} | {seconds:.0f} |")
        print(table[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        bundles: dict[tuple[str, str, str], Path] = {}

        def calibration_sampler(sampler_name: str, calibrator: str) -> str:
            """The sampler whose trajectories calibrate a bundle evaluated under `sampler_name`: DDIM for the
            DDIM-unrolling calibrators, else --calibrate-on, else the evaluated sampler itself."""
            return "ddim" if calibrator in TRAJECTORY_CALIBRATORS else args.calibrate_on or sampler_name

        def bundle_for(sampler_name: str, bits: str, calibrator: str) -> Path:
            """Export (once) the bundle of a calibrator, calibrated on `calibration_sampler`'s trajectories."""
            sampler = SAMPLERS[calibration_sampler(sampler_name, calibrator)]
            key = (sampler.scheduler, bits, calibrator)
            if key not in bundles:
                weight_bits, act_bits = BITS[bits]
                out = workdir / "-".join(key)
                export_quantized(
                    ExportConfig(
                        model=CONDITIONAL_DEMO_NAME,
                        out=out,
                        sampler=sampler,
                        quant=QuantSpec(
                            weight_bits, act_bits, split_skip_concat=calibrator in RECONSTRUCTION_CALIBRATORS
                        ),
                        progress=False,
                        calibration=CalibrationConfig(
                            calibrator=calibrator,
                            reconstruction=ReconstructionConfig(iters=args.recon_iters),
                            samples=args.calib_samples,
                        ),
                        checks=ChecksConfig(eval_samples=2, require_parity=False),
                    )
                )
                bundles[key] = out
            return bundles[key]

        def run(sampler_name: str, backend, corrections=None) -> Evaluation:
            return evaluate(
                fp,
                backend,
                schedule,
                range(args.n),
                shape,
                SAMPLERS[sampler_name],
                progress=False,
                corrections=corrections,
                conditioning=rows,
                requested=requested,
            )

        first = args.schedulers.split(",")[0]
        reference = load_bundle(
            bundle_for(
                first,
                args.compare_at if args.correction is None else args.bits.split(",")[0],
                "reconstruct" if args.correction is None else args.calibrators.split(",")[0],
            )
        )
        fp = reference_backend(reference, threads=2)
        deployed = quantized_backend(reference, threads=2)
        if args.correction is not None:
            method, _, where = args.correction.partition(":")
            best, best_psnr = (method, where == "per-branch"), float("inf")
        else:
            best, best_psnr = ("none", False), run(first, deployed).psnr_to_fp_db
            choice.append(f"| none | - | {best_psnr:.2f} | - | - |")
        for method in CORRECTIONS if args.correction is None else []:
            for per_branch in (False, True):
                terms = estimate_corrections(
                    method,
                    TorchBackend(fp_model),
                    deployed,
                    schedule,
                    calib_seeds,
                    shape,
                    SAMPLERS[first],
                    progress=False,
                    conditioning=rows,
                    per_branch=per_branch,
                )
                result = run(first, deployed, terms)
                choice.append(
                    f"| {method} | {'per branch' if per_branch else 'guided estimate'} | {result.psnr_to_fp_db:.2f} | "
                    f"{result.fd_to_fp:.3f} | {result.class_accuracy:.3f} ({result.fp_class_accuracy:.3f}) |"
                )
                print(choice[-1], flush=True)
                if result.psnr_to_fp_db > best_psnr:
                    best, best_psnr = (method, per_branch), result.psnr_to_fp_db
        best_label = f"{best[0]} ({'per branch' if best[1] else 'guided'})"

        for sampler_name in args.schedulers.split(","):
            if not args.no_modelopt:
                calib = collect_calibration_set(
                    TorchBackend(fp_model),
                    schedule,
                    calib_seeds,
                    shape,
                    SAMPLERS[sampler_name],
                    SAMPLERS[sampler_name].steps,
                    progress=False,
                    conditioning=rows,
                )
            for bits in args.bits.split(","):
                if not args.no_modelopt:
                    backend, seconds = modelopt_max(fp_model, calib, bits)
                    row(sampler_name, bits, "modelopt max", "none", run(sampler_name, backend), seconds)
                for calibrator in args.calibrators.split(","):
                    bundle = load_bundle(bundle_for(sampler_name, bits, calibrator))
                    seconds = bundle.manifest.info["calibration"]["seconds"]
                    deployed = quantized_backend(bundle, threads=2)
                    calibrated_on = calibration_sampler(sampler_name, calibrator)
                    name = f"stepquant {calibrator}" + (
                        f" ({calibrated_on.upper()}-calibrated)" if calibrated_on != sampler_name else ""
                    )
                    row(sampler_name, bits, name, "none", run(sampler_name, deployed), seconds)
                    if best[0] != "none":
                        terms = estimate_corrections(
                            best[0],
                            TorchBackend(fp_model),
                            deployed,
                            schedule,
                            calib_seeds,
                            shape,
                            SAMPLERS[sampler_name],
                            progress=False,
                            conditioning=rows,
                            per_branch=best[1],
                        )
                        row(sampler_name, bits, name, best_label, run(sampler_name, deployed, terms), seconds)
    if args.correction is None:
        lines += [
            f"Corrections at {args.compare_at} after reconstruct, {SAMPLERS[first].describe()}: on the guided "
            "estimate against per "
            "branch (terms fitted to both halves' outputs, applied alike to each).",
            "",
            *choice,
            "",
        ]
    lines += [
        f"Every method; 'best' is {best_label}" + (" (given by --correction)." if args.correction else "."),
        "",
        *table,
        "",
        f"Total wall time {time.perf_counter() - start:.0f} s.",
    ]
    section = (
        f"bench_conditional_methods_{args.schedulers.replace(',', '_')}{'_' + args.section if args.section else ''}"
    )
    sampler_page = page().with_name("conditional-methods-dpm-solver.md") if "dpm-solver++" in args.schedulers else None
    publish(section, [header(), *lines], not args.no_write, sampler_page)


if __name__ == "__main__":
    main()
