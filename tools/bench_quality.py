"""Quality side by side on the demo model: stepquant against modelopt and onnxruntime's quantize_static,
with the same FP model, calibration inputs and evaluation seeds, every method judged by the same
`stepquant.eval.evaluate` against the FP graph on onnxruntime.

    pip install '.[bench]'
    python tools/bench_quality.py [--n 512] [--eta 0] [--only stepquant] [--smoke]

stepquant and quantize_static are executed as ONNX Q/DQ graphs on onnxruntime (the deployed form).
modelopt is executed as its own torch fake-quant model (its ONNX export targets TensorRT; its INT4
weights do not export to a graph onnxruntime runs), which is the most favourable reading of it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from benchdoc import header, parse_options, write_section

from stepquant.bundle import load_bundle
from stepquant.calibrators import collect_calibration_set
from stepquant.calibrators.data import CalibrationSet
from stepquant.eval.evaluate import Evaluation, evaluate
from stepquant.export.config import CalibrationConfig, ChecksConfig
from stepquant.export.onnx_export import export_onnx
from stepquant.models import DEMO_MODEL_NAME, EpsilonModel, load_model
from stepquant.models.torch_backend import TorchBackend
from stepquant.pipeline import CALIBRATION_SEED_OFFSET, ExportConfig, export_quantized
from stepquant.quant import DEFAULT_EXCLUDE, QuantSpec
from stepquant.runtime import OnnxRuntimeBackend, SamplerConfig
from stepquant.runtime.backend import Backend
from stepquant.runtime.bundle_backends import quantized_backend

BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}


@dataclass
class Row:
    method: str
    bits: str
    executed_by: str
    calibration_seconds: float
    result: Evaluation


@dataclass
class Context:
    fp_model: EpsilonModel
    noise_schedule: dict
    shape: tuple[int, int, int]
    calib: CalibrationSet
    fp_onnx: Path
    workdir: Path
    calib_samples: int
    sampler: SamplerConfig


def stepquant_method(bits: str, residuals: bool = True) -> Callable[[Context], tuple[Backend, float, str]]:
    def run(ctx: Context):
        weight_bits, act_bits = BITS[bits]
        report = export_quantized(
            ExportConfig(
                model=DEMO_MODEL_NAME,
                out=ctx.workdir / f"stepquant-{bits}-{residuals}",
                quant=QuantSpec(weight_bits, act_bits, quantize_residuals=residuals),
                sampler=ctx.sampler,
                progress=False,
                calibration=CalibrationConfig(samples=ctx.calib_samples),
                checks=ChecksConfig(eval_samples=8, require_parity=False),
            )
        )
        executed = (
            f"onnxruntime (Q/DQ ONNX; layer-wise parity {'pass' if report.parity_passed else 'FAIL'}, "
            f"end-to-end worst median rel. error {report.end_to_end.worst_median_reldiff:.1e})"
        )
        return quantized_backend(load_bundle(report.bundle), threads=2), report.calibration_seconds, executed

    return run


def modelopt_max(fp_model: EpsilonModel, calib: CalibrationSet, bits: str) -> tuple[TorchBackend, float]:
    """modelopt's INT8_DEFAULT_CFG at these bits (max calibration), its forward loop fed every calibration input
    (with their condition inputs: both halves of guided calls); returns the fake-quant model and its seconds."""
    import modelopt.torch.quantization as mtq

    weight_bits, act_bits = BITS[bits]
    config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    for entry in config["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"] = {"num_bits": weight_bits, "axis": 0}
        if entry.get("quantizer_name") == "*input_quantizer":
            entry["cfg"] = {"num_bits": act_bits, "axis": None}
    start = time.perf_counter()
    model = copy.deepcopy(fp_model)

    def forward_loop(m):
        for inputs in calib.batches(64):
            m(*inputs)

    with torch.no_grad():
        model = mtq.quantize(model, config, forward_loop)
    # modelopt's diffusers example disables the same layers after calibration (filter_func_default)
    pattern = re.compile("|".join(DEFAULT_EXCLUDE))
    mtq.disable_quantizer(model, lambda name: bool(pattern.search(name)))
    return TorchBackend(model), time.perf_counter() - start


def leave_out(name: str, smoke: bool) -> bool:
    """Whether a modelopt row is left out: modelopt missing in a smoke run (a full run without it stops)."""
    if "modelopt" not in name or importlib.util.find_spec("modelopt"):
        return False
    if not smoke:
        raise SystemExit("modelopt is not installed: pip install '.[bench]' (or leave its rows out with --only)")
    print(f"{name}: left out of the smoke run (modelopt is not installed)")
    return True


def modelopt_method(bits: str) -> Callable[[Context], tuple[Backend, float, str]]:
    def run(ctx: Context):
        return *modelopt_max(ctx.fp_model, ctx.calib, bits), "torch (modelopt fake-quant)"

    return run


def ort_static_method(calibrate_method: str) -> Callable[[Context], tuple[Backend, float, str]]:
    def run(ctx: Context):
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        # ORT's histogram collectors need equal batch sizes: use the largest divisor of the set size up to 64
        batch_size = max(d for d in range(1, 65) if len(ctx.calib) % d == 0)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(list(ctx.calib.batches(batch_size)))

            def get_next(self):
                batch = next(self.batches, None)
                return None if batch is None else {"sample": batch[0].numpy(), "timestep": batch[1].numpy()}

        pattern = re.compile("|".join(DEFAULT_EXCLUDE))
        excluded = [n.name for n in onnx.load(str(ctx.fp_onnx)).graph.node if pattern.search(n.name)]
        out = ctx.workdir / f"ort-{calibrate_method}.onnx"
        start = time.perf_counter()
        quantize_static(
            str(ctx.fp_onnx),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            nodes_to_exclude=excluded,
            calibrate_method=getattr(CalibrationMethod, calibrate_method),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        return OnnxRuntimeBackend(out, threads=2), time.perf_counter() - start, "onnxruntime (Q/DQ ONNX)"

    return run


METHODS: list[tuple[str, str, Callable[[Context], tuple[Backend, float, str]]]] = [
    *[("stepquant (max)", bits, stepquant_method(bits)) for bits in BITS],
    # modelopt's torch path leaves residual skips in FP; this row compares like with like
    ("stepquant (max, no residual Q/DQ)", "W8A8", stepquant_method("W8A8", residuals=False)),
    *[("modelopt (max)", bits, modelopt_method(bits)) for bits in BITS],
    *[(f"ORT quantize_static ({m})", "W8A8", ort_static_method(m)) for m in ("MinMax", "Entropy", "Percentile")],
]


def table(rows: list[Row], n: int, sampler: SamplerConfig) -> str:
    lines = [
        f"{n} seeds, {sampler.steps} {sampler.scheduler.upper()} steps, eta {sampler.eta:g}. FD = Fréchet distance in "
        "the "
        "digit classifier's features; agreement = same predicted digit as the FP sample of the same seed; "
        "recognisable = classifier confidence >= 0.9.",
        "",
        "| method | bits | PSNR to FP (dB) | FD to FP | FD to data | agreement | recognisable | calibration (s) | "
        "executed by |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fp = rows[0].result
    lines.append(
        f"| FP32 reference | - | - | 0 | {fp.fp_fd_to_data:.2f} | 1 | {fp.fp_recognisable:.3f} | - | onnxruntime |"
    )
    for r in rows:
        e = r.result
        lines.append(
            f"| {r.method} | {r.bits} | {e.psnr_to_fp_db:.2f} | {e.fd_to_fp:.3f} | {e.fd_to_data:.2f} | "
            f"{e.label_agreement:.3f} | {e.recognisable:.3f} | {r.calibration_seconds:.1f} | {r.executed_by} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512, help="evaluation seeds")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--only", default="", help="run only methods whose name contains this text")
    parser.add_argument(
        "--no-write", action="store_true", help="print the table without updating its docs/benchmarks page"
    )
    args = parse_options(parser, n=4, steps=4, calib_samples=4)
    methods = [m for m in METHODS if args.only in m[0] and not leave_out(m[0], args.smoke)]  # before the calibration
    torch.set_num_threads(2)
    start = time.perf_counter()
    loaded = load_model(DEMO_MODEL_NAME)
    shape = (1, loaded.denoiser.config.sample_size, loaded.denoiser.config.sample_size)
    sampler = SamplerConfig("ddim", args.steps, args.eta)
    fp_model = EpsilonModel(loaded.denoiser)
    seeds = range(CALIBRATION_SEED_OFFSET, CALIBRATION_SEED_OFFSET + args.calib_samples)  # what export_quantized uses
    calib = collect_calibration_set(
        TorchBackend(fp_model), loaded.scheduler_config, seeds, shape, sampler, args.steps, progress=False
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        export_onnx(fp_model, workdir / "fp32.onnx", shape)
        ctx = Context(
            fp_model, loaded.scheduler_config, shape, calib, workdir / "fp32.onnx", workdir, args.calib_samples, sampler
        )
        fp_backend = OnnxRuntimeBackend(ctx.fp_onnx, threads=2)
        for name, bits, method in methods:
            backend, seconds, executed_by = method(ctx)
            result = evaluate(
                fp_backend, backend, loaded.scheduler_config, range(args.n), shape, sampler, progress=False
            )
            rows.append(Row(name, bits, executed_by, seconds, result))
            print(
                f"{name:32} {bits}  PSNR {result.psnr_to_fp_db:6.2f} dB  FD-to-FP {result.fd_to_fp:7.3f}  "
                f"recognisable {result.recognisable:.3f}  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    text = table(rows, args.n, sampler)
    print(text)
    if not args.no_write and not args.only:
        write_section(
            f"bench_quality_eta{args.eta:g}",
            header() + f"Total wall time {time.perf_counter() - start:.0f} s.\n\n" + text,
        )


if __name__ == "__main__":
    main()
