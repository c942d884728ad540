"""`export-quantized` and `stepquant` (subcommands `export`, `sample`).

Every expected failure (bad model, bad bundle, bad option value, calibration or parity failure)
ends in one `error:` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from stepquant.calibrators import CalibrationError
from stepquant.eval import save_grid
from stepquant.export import BundleError, OnnxExportError, load_bundle
from stepquant.models import DEMO_MODEL_NAME, EpsilonModel, ModelLoadError, load_model
from stepquant.pipeline import ExportConfig, ExportReport, ParityError, export_quantized
from stepquant.quant import DEFAULT_EXCLUDE, QuantSpec
from stepquant.runtime import OnnxRuntimeBackend, SamplerConfig, TorchBackend, sample

EXPECTED_ERRORS = (ModelLoadError, BundleError, CalibrationError, ParityError, OnnxExportError, ValueError, OSError)


class Observer(str, Enum):
    max = "max"
    percentile = "percentile"
    mse = "mse"


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
    print(f"layers:  {len(report.quantized_layers)} quantized at W{spec.weight_bits}A{spec.act_bits}; "
          f"done in {report.seconds:.0f} s")


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(help="Bundle directory to write (atomically).")],
    model: Annotated[str, typer.Option(help=f"'{DEMO_MODEL_NAME}', a local diffusers directory, or a hub id.")] = DEMO_MODEL_NAME,
    weight_bits: Annotated[int, typer.Option(help="Weight bits (per output channel, symmetric).")] = 8,
    act_bits: Annotated[int, typer.Option(help="Activation bits (per tensor, symmetric).")] = 8,
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
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Calibrate, quantize and export a diffusion model into a bundle (Q/DQ ONNX, manifest, parity data)."""
    patterns = (DEFAULT_EXCLUDE if default_excludes else ()) + tuple(exclude or ())
    config = ExportConfig(
        model=model, out=out, quant=QuantSpec(weight_bits, act_bits, patterns),
        sampler=SamplerConfig(scheduler.value, steps, eta), observer=observer.value, percentile=percentile,
        calib_samples=calib_samples, calib_steps=calib_steps, seed=seed, eval_samples=eval_samples,
        overwrite=overwrite, progress=progress,
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
        backend, noise_schedule, shape = (OnnxRuntimeBackend(loaded.file(loaded.manifest["timestep_groups"][0]["graph"]), threads),
                                          loaded.manifest["noise_schedule"], loaded.sample_shape)
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


def _run(app_: typer.Typer, prog_name: str) -> None:
    """Run a typer app, turning usage errors and expected failures into one line and an exit code."""
    try:
        typer.main.get_command(app_).main(prog_name=prog_name, standalone_mode=False)
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
