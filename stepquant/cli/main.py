"""`export-quantized` and `stepquant` (subcommands `export`, `sample`).

Every expected failure (bad model, bad bundle, bad option value, calibration or parity failure)
ends in one `error:` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from stepquant.calibrators import CalibrationError
from stepquant.eval import save_grid
from stepquant.eval.evaluate import evaluate, plot_errors
from stepquant.eval.latency import measure_latency
from stepquant.export import BundleError, OnnxExportError, load_bundle
from stepquant.models import DEMO_MODEL_NAME, EpsilonModel, ModelLoadError, load_model
from stepquant.export.lint import LintError, lint
from stepquant.export.parity import replay_parity
from stepquant.export.bundle import extend_bundle
from stepquant.export.tensorrt import (ENGINE_FILE, TIMING_CACHE_FILE, BatchProfile, TensorRTUnavailable, build_engine,
                                       tensorrt_version)
from stepquant.pipeline import MODEL_FILE, ExportConfig, ExportReport, ParityError, export_quantized
from stepquant.quant import DEFAULT_EXCLUDE, QuantSpec
from stepquant.runtime import SamplerConfig, TorchBackend, sample
from stepquant.runtime.bundle_backends import quantized_backend, reference_backend

EXPECTED_ERRORS = (ModelLoadError, BundleError, CalibrationError, ParityError, OnnxExportError, LintError, TensorRTUnavailable,
                   ValueError, OSError)


class Observer(str, Enum):
    max = "max"
    percentile = "percentile"
    mse = "mse"


class Format(str, Enum):
    int8 = "int8"
    fp8 = "fp8"


class Target(str, Enum):
    tensorrt = "tensorrt"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


class Scheduler(str, Enum):
    ddim = "ddim"
    ddpm = "ddpm"


app = typer.Typer(help="Quantize diffusion models into deployable Q/DQ ONNX bundles, and run them.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _print_report(report: ExportReport, config: ExportConfig) -> None:
    spec = config.quant
    print(f"bundle:  {report.bundle}")
    print(f"preview: {report.preview}  (left: FP torch, right: quantized bundle on onnxruntime, same seeds)")
    for label, parity in (("Q/DQ ONNX vs fake-quant torch", report.qdq_parity), ("FP ONNX vs FP torch", report.fp_parity)):
        print(f"parity:  {label}: worst median relative error {parity.worst_median_reldiff:.2e} "
              f"(tolerance {parity.tolerance_median_rel:g}) over {len(parity.timesteps)} timesteps: "
              f"{'PASS' if parity.passed else 'FAIL'}")
    print(f"quality: PSNR to FP {report.psnr_mean_db:.2f} dB mean, {report.psnr_min_db:.2f} dB min, over "
          f"{report.eval_samples} seeds, {config.sampler.steps} {config.sampler.scheduler.upper()} steps "
          f"(eta {config.sampler.eta:g}), bundle executed by onnxruntime")
    print("lint:    TensorRT Q/DQ conformance: no findings")
    print(f"layers:  {len(report.quantized_layers)} quantized at {spec.weight_grid} weights, {spec.act_grid} activations; "
          f"done in {report.seconds:.0f} s")


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(help="Bundle directory to write (atomically).")],
    model: Annotated[str, typer.Option(help=f"'{DEMO_MODEL_NAME}', a local diffusers directory, or a hub id.")] = DEMO_MODEL_NAME,
    weight_bits: Annotated[int, typer.Option(help="Weight bits (per output channel, symmetric).")] = 8,
    act_bits: Annotated[int, typer.Option(help="Activation bits (per tensor, symmetric).")] = 8,
    format: Annotated[Format, typer.Option(help="int8, or fp8 (E4M3, for Ada/Hopper GPUs).")] = Format.int8,
    target: Annotated[Target, typer.Option(help="Placement profile of the Q/DQ graph.")] = Target.tensorrt,
    precision: Annotated[Precision, typer.Option(help="Float compute and Q/DQ scales: fp32, or fp16 for FP16 engines.")] = Precision.fp32,
    residual_qdq: Annotated[bool, typer.Option(help="Q/DQ on the skip input of ResNet residual Adds (TensorRT fuses Conv+Add).")] = True,
    steps: Annotated[int, typer.Option(help="Sampler steps for calibration trajectories and evaluation.")] = 25,
    scheduler: Annotated[Scheduler, typer.Option(help="Sampler for trajectories and evaluation.")] = Scheduler.ddim,
    eta: Annotated[float, typer.Option(help="DDIM eta (0: deterministic).")] = 0.0,
    calib_samples: Annotated[int, typer.Option(help="Calibration trajectories (seeded noise samples).")] = 64,
    calib_steps: Annotated[Optional[int], typer.Option(help="Sampler steps kept per trajectory (default: all).")] = None,
    observer: Annotated[Observer, typer.Option(help="How the activation range is chosen.")] = Observer.max,
    percentile: Annotated[float, typer.Option(help="Percentile of |x| for --observer percentile.")] = 99.99,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Extra layer-name regex to keep in FP (repeatable).")] = None,
    default_excludes: Annotated[bool, typer.Option(help="Apply the default exclusions (embeddings, conv_in/out, shortcuts).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of calibration and evaluation noise.")] = 0,
    eval_samples: Annotated[int, typer.Option(help="Seeds sampled to report PSNR to FP.")] = 256,
    engine: Annotated[bool, typer.Option(help="Also build the TensorRT engine (needs TensorRT here).")] = False,
    allow_parity_failure: Annotated[bool, typer.Option(help="Keep a bundle whose Q/DQ parity check fails (recorded as failed).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Calibrate, quantize and export a diffusion model into a bundle (Q/DQ ONNX, manifest, parity data)."""
    patterns = (DEFAULT_EXCLUDE if default_excludes else ()) + tuple(exclude or ())
    config = ExportConfig(
        model=model, out=out, quant=QuantSpec(weight_bits, act_bits, patterns, format.value, residual_qdq),
        precision=precision.value,
        sampler=SamplerConfig(scheduler.value, steps, eta), observer=observer.value, percentile=percentile,
        calib_samples=calib_samples, calib_steps=calib_steps, seed=seed, eval_samples=eval_samples,
        engine=engine, require_parity=not allow_parity_failure, overwrite=overwrite, progress=progress,
    )
    _print_report(export_quantized(config), config)


def _write_samples(samples, out: Path) -> None:
    """Write a PNG grid or an .npz (key `samples`) via a temporary file, so no partial output remains."""
    if out.suffix not in (".png", ".npz"):
        raise ValueError(f"--out must end in .png (a grid) or .npz (raw samples), got {out.name}")
    if not out.parent.is_dir():
        raise ValueError(f"cannot write {out}: {out.parent} is not an existing directory")
    handle, temporary = tempfile.mkstemp(suffix=out.suffix, dir=out.parent)
    os.close(handle)
    try:
        if out.suffix == ".png":
            save_grid(samples, Path(temporary))
        else:
            np.savez(temporary, samples=samples.numpy().astype(np.float32))
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@app.command("sample")
def sample_command(
    out: Annotated[Path, typer.Option(help="Output: .png grid or .npz with key 'samples' (N,C,H,W in [-1, 1]).")],
    bundle: Annotated[Optional[Path], typer.Option(help="Bundle to run (onnxruntime).")] = None,
    model: Annotated[Optional[str], typer.Option(help="FP model to run (torch), seeded exactly as a bundle.")] = None,
    n: Annotated[int, typer.Option(help="Number of samples (seeds seed .. seed+n-1).")] = 64,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps (default: the bundle's, else 25).")] = None,
    eta: Annotated[float, typer.Option(help="DDIM eta (0: deterministic).")] = 0.0,
    scheduler: Annotated[Scheduler, typer.Option(help="Sampler.")] = Scheduler.ddim,
    batch_size: Annotated[int, typer.Option(help="Samples per network call.")] = 64,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads (default: all cores).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Sample from a bundle or from an FP model with per-sample seeds, so outputs compare one to one."""
    if (bundle is None) == (model is None):
        raise typer.BadParameter("give exactly one of --bundle and --model")
    if n < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--n")
    if bundle is not None:
        loaded = load_bundle(bundle)
        backend, noise_schedule, shape = quantized_backend(loaded, threads), loaded.manifest["noise_schedule"], loaded.sample_shape
        default_steps = loaded.manifest["sampler"]["steps"]
    else:
        fp = load_model(model)
        backend, noise_schedule = TorchBackend(EpsilonModel(fp.unet)), fp.scheduler_config
        shape, default_steps = (fp.unet.config.in_channels, fp.unet.config.sample_size, fp.unet.config.sample_size), 25
    config = SamplerConfig(scheduler.value, steps or default_steps, eta)
    result = sample(backend, noise_schedule, range(seed, seed + n), shape, config, batch_size, progress=progress)
    _write_samples(result.samples, out)
    print(f"wrote {n} samples ({config.steps} {config.scheduler.upper()} steps, eta {config.eta:g}) to {out}")


def _fail(prog_name: str, message: str, code: int) -> None:
    print(f"{prog_name}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


@app.command("eval")
def eval_command(
    bundle: Annotated[Path, typer.Option(help="Bundle to evaluate (its Q/DQ graph against its FP graph, both on onnxruntime).")],
    n: Annotated[int, typer.Option(help="Number of seeds (0 .. n-1).")] = 1024,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps (default: the bundle's).")] = None,
    eta: Annotated[float, typer.Option(help="DDIM eta (0: deterministic).")] = 0.0,
    scheduler: Annotated[Scheduler, typer.Option(help="Sampler.")] = Scheduler.ddim,
    out: Annotated[Optional[Path], typer.Option(help="Directory for eval.json and errors.png (default: BUNDLE-eval).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Quality of a bundle against FP from the same noise: PSNR, Fréchet distances, classifier, error per step."""
    if n < 2:
        raise typer.BadParameter("must be at least 2 (Fréchet distances need a covariance)", param_hint="--n")
    loaded = load_bundle(bundle)
    config = SamplerConfig(scheduler.value, steps or loaded.manifest["sampler"]["steps"], eta)
    result = evaluate(reference_backend(loaded, threads), quantized_backend(loaded, threads), loaded.manifest["noise_schedule"],
                      range(n), loaded.sample_shape, config, progress=progress)
    out = out or bundle.with_name(bundle.name + "-eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"bundle": str(bundle), "sampler": asdict(config), **result.to_dict()}, indent=2))
    plot_errors(result, out / "errors.png", title=f"{bundle.name}: {n} samples, {config.steps} steps, eta {eta:g}")
    rows = [("PSNR to FP (dB, mean / min)", f"{result.psnr_to_fp_db:.2f} / {result.psnr_to_fp_db_min:.2f}"),
            ("FD to FP", f"{result.fd_to_fp:.3f}"),
            ("FD to data (quantized / FP)", f"{result.fd_to_data:.3f} / {result.fp_fd_to_data:.3f}"),
            ("label agreement with FP", f"{result.label_agreement:.3f}"),
            ("confidence (quantized / FP)", f"{result.confidence:.3f} / {result.fp_confidence:.3f}"),
            ("recognisable (quantized / FP)", f"{result.recognisable:.3f} / {result.fp_recognisable:.3f}"),
            ("final accumulated / mean per-step error", f"{result.accumulated_error[-1]:.4f} / {np.mean(result.step_error):.4f}")]
    width = max(len(label) for label, _ in rows)
    print(f"{bundle} on onnxruntime: {n} samples, {config.steps} {config.scheduler.upper()} steps, eta {eta:g}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    print(f"wrote {out / 'eval.json'} and {out / 'errors.png'}")


@app.command("bench")
def bench_command(
    bundle: Annotated[Path, typer.Option(help="Bundle whose graphs to time.")],
    batch: Annotated[Optional[list[int]], typer.Option(help="Batch size (repeatable; default 1 and 8).")] = None,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads.")] = 2,
) -> None:
    """Per-forward latency of the bundle's Q/DQ graph against its FP32 graph on onnxruntime."""
    loaded = load_bundle(bundle)
    graphs = {"onnxruntime FP32": reference_backend(loaded, threads), "onnxruntime Q/DQ": quantized_backend(loaded, threads)}
    print(f"{bundle}: {threads} threads, median of at least 10 calls after 3 warm-up calls")
    for size in batch or [1, 8]:
        if size < 1:
            raise typer.BadParameter("must be at least 1", param_hint="--batch")
        results = {label: measure_latency(backend, loaded.sample_shape, size) for label, backend in graphs.items()}
        fp_ms = results["onnxruntime FP32"].median_ms
        for label, result in results.items():
            print(f"  batch {size:<3} {label:<18} {result.median_ms:9.2f} ms  {result.images_per_second:9.1f} images/s  "
                  f"{fp_ms / result.median_ms:5.2f}x vs FP32")


@app.command("lint")
def lint_command(model: Annotated[Path, typer.Argument(help="A Q/DQ ONNX model, or a bundle directory.")]) -> None:
    """Check a Q/DQ ONNX graph against TensorRT's explicit-quantization rules; exit 1 on any finding."""
    path = load_bundle(model).file(MODEL_FILE) if model.is_dir() else model
    if not path.is_file():
        raise ValueError(f"{path} not found")
    findings = lint(path)
    for finding in findings:
        print(finding)
    print(f"{path}: {len(findings)} TensorRT rule violation(s)" if findings else f"{path}: conforms to TensorRT's Q/DQ rules")
    if findings:
        raise typer.Exit(1)


class ParityBackend(str, Enum):
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


@app.command("parity")
def parity_command(
    bundle: Annotated[Path, typer.Option(help="Bundle whose saved parity inputs to replay.")],
    backend: Annotated[ParityBackend, typer.Option(help="Runtime to check against the saved reference outputs.")] = ParityBackend.onnxruntime,
    rtol: Annotated[float, typer.Option(help="Tolerance on the median relative error of 'eps' at each timestep.")] = 1e-3,
    engine: Annotated[Optional[Path], typer.Option(help="TensorRT engine (default: the bundle's model.plan).")] = None,
) -> None:
    """Replay the bundle's parity inputs (Polygraphy JSON) and compare with its reference outputs; exit 1 on failure."""
    report = replay_parity(load_bundle(bundle), backend.value, rtol, engine)
    print(f"{bundle}: {backend.value} against the saved fake-quant torch outputs (tolerance: median relative error <= {rtol:g})")
    print(f"  {'timestep':>8}  {'median rel':>10}  {'p' + str(round(100 * report.error_quantile)) + ' rel':>10}  {'max abs':>10}")
    for t in report.timesteps:
        print(f"  {t.timestep:8.0f}  {t.median_reldiff:10.2e}  {t.quantile_reldiff:10.2e}  {t.max_absdiff:10.2e}  "
              f"{'PASS' if t.passed else 'FAIL'}")
    print("parity: PASS" if report.passed else "parity: FAIL")
    if not report.passed:
        raise typer.Exit(1)


@app.command("build-engine")
def build_engine_command(
    bundle: Annotated[Path, typer.Option(help="Bundle to build the TensorRT engine for (on this machine's GPU).")],
    min_batch: Annotated[int, typer.Option(help="Smallest batch of the optimisation profile.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="Batch TensorRT tunes for.")] = 8,
    max_batch: Annotated[int, typer.Option(help="Largest batch of the optimisation profile.")] = 64,
) -> None:
    """Build a strongly typed TensorRT engine from the bundle's Q/DQ graph and add it to the bundle."""
    loaded = load_bundle(bundle)
    profile = BatchProfile(min_batch, opt_batch, max_batch)
    version = tensorrt_version()  # a clear error before anything is staged

    def add_engine(staging: Path) -> None:
        build_engine(staging / MODEL_FILE, staging / ENGINE_FILE, loaded.sample_shape, profile, staging / TIMING_CACHE_FILE)

    engine = {**loaded.manifest.get("engine", {}), "plan": ENGINE_FILE, "batch_profile": asdict(profile),
              "tensorrt_version": version}
    extended = extend_bundle(loaded, add_engine, {"engine": engine})
    print(f"built {extended.file(ENGINE_FILE)} with TensorRT {extended.manifest['engine']['tensorrt_version']}")


def _run(app_: typer.Typer, prog_name: str) -> None:
    """Run a typer app, turning usage errors and expected failures into one line and an exit code."""
    try:
        code = typer.main.get_command(app_).main(prog_name=prog_name, standalone_mode=False)
        if isinstance(code, int) and code:  # without standalone mode, an Exit comes back as the return value
            sys.exit(code)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        _fail(prog_name, "aborted", 130)
    except typer.TyperException as err:  # usage errors: unknown option values, missing options
        _fail(prog_name, err.format_message(), getattr(err, "exit_code", 2))
    except EXPECTED_ERRORS as err:
        _fail(prog_name, str(err), 1)


def main() -> None:
    """Entry point of `stepquant`."""
    _run(app, "stepquant")


def export_quantized_main() -> None:
    """Entry point of `export-quantized` (the same command as `stepquant export`)."""
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command()(export_command)
    _run(single, "export-quantized")
