"""`export-quantized` / `stepquant export`: options in, `export_quantized(ExportConfig)` called, report out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stepquant.calibrators import distributed
from stepquant.calibrators.calibrate import RECONSTRUCTION_CALIBRATORS
from stepquant.calibrators.reconstruction import ReconstructionConfig
from stepquant.cli.choices import Correction, Scheduler
from stepquant.cli.export_choices import Calibrator, Format, FpDtype, Precision, Target
from stepquant.cli.options import Classes, SignKey, parse_classes
from stepquant.export.config import CalibrationConfig, ChecksConfig, ConditioningConfig, CorrectionConfig, ExportConfig
from stepquant.export.shapes import DimRange, ShapeProfile
from stepquant.models import DEMO_MODEL_NAME
from stepquant.pipeline import ExportReport, export_quantized
from stepquant.quant import DEFAULT_EXCLUDE, QuantSpec
from stepquant.runtime import SamplerConfig


def _print_report(report: ExportReport, config: ExportConfig) -> None:
    spec = config.quant
    print(f"bundle:  {report.bundle}")
    print(
        f"preview: {report.preview}  (left: FP torch, right: the {config.targets[0]} graph on onnxruntime, same seeds)"
    )
    fp = report.fp_parity
    print(
        f"parity:  FP ONNX vs FP torch: worst median relative error {fp.worst_median_reldiff:.2e} "
        f"(tolerance {fp.tolerance_median_rel:g}): {'PASS' if fp.passed else 'FAIL'}"
    )
    for target, result in report.targets.items():
        print(f"{target}: {', '.join(result.graphs)}")
        for graph, layerwise in zip(result.graphs, result.layerwise):
            print(
                f"  parity:  {graph} vs fake-quant torch, layer by layer over {layerwise.feeds} inputs: "
                f"{'PASS' if layerwise.passed else 'FAIL'}\n           {layerwise.summary()}"
            )
        end_to_end = result.end_to_end
        print(
            f"  end to end: worst median relative error {end_to_end.worst_median_reldiff:.2e} over "
            f"{len(end_to_end.timesteps)} inputs (information; `stepquant parity` replays at "
            f"{end_to_end.tolerance_median_rel:.2g})"
        )
        print(
            f"  quality: PSNR to FP {result.psnr_mean_db:.2f} dB mean, {result.psnr_min_db:.2f} dB min "
            f"({result.space}s), over "
            f"{report.eval_samples} seeds, {config.sampler.describe()}, executed by onnxruntime"
        )
        if result.integer_kernels is None:
            print("  lint:    TensorRT Q/DQ conformance: no findings")
        else:
            kernels = result.integer_kernels
            print(
                "  kernels: onnxruntime runs "
                f"{', '.join(f'{n} {op}' for op, n in kernels['integer_kernels'].items())}; "
                "fused vs simulation: median relative error up to "
                f"{max(kernels['fused_kernels_median_reldiff'].values()):.1e} "
                "(parity above: Q/DQ as written, optimisations off)"
            )
    print(
        f"calib:   {config.calibration.calibrator}; correction: {config.correction.method} (applied by the sampler "
        "host loop)"
    )
    if config.more_samplers:
        terms = " and correction terms" if config.correction.enabled else ""
        print(
            f"samplers: {config.sampler.spec} calibrated for, the default; each with its own table{terms}; PSNR to FP "
            f"on the {config.targets[0]} graph:"
        )
        for entry in report.samplers:
            mean, low = entry.quality["psnr_to_fp_db_mean"], entry.quality["psnr_to_fp_db_min"]
            print(f"  {entry.sampler.spec}: {mean:.2f} dB mean, {low:.2f} dB min")
    print(
        f"layers:  {len(report.quantized_layers)} quantized at {spec.weight_grid} weights, {spec.act_grid} "
        "activations; "
        f"done in {report.seconds:.0f} s"
    )


def _samplers(specs: list[str] | None, single: SamplerConfig) -> tuple[SamplerConfig, ...]:
    """The samplers to store: the --sampler specs (guided at --guidance-scale), else the one of --scheduler etc."""
    if not specs:
        return (single,)
    if single.overridden(guidance_scale=1.0) != SamplerConfig():
        raise typer.BadParameter(
            "give --sampler, or --scheduler/--steps/--eta/--karras-sigmas, not both", param_hint="--sampler"
        )
    try:
        return tuple(SamplerConfig.parse(spec, single.guidance_scale) for spec in specs)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--sampler") from None


def export_command(
    out: Annotated[Path, typer.Option(rich_help_panel="Model", help="Bundle directory to write (atomically).")],
    model: Annotated[
        str,
        typer.Option(rich_help_panel="Model", help=f"'{DEMO_MODEL_NAME}', a local diffusers directory, or a hub id."),
    ] = DEMO_MODEL_NAME,
    weight_bits: Annotated[
        int, typer.Option(rich_help_panel="Quantization", help="Weight bits (per output channel, symmetric).")
    ] = 8,
    act_bits: Annotated[
        int, typer.Option(rich_help_panel="Quantization", help="Activation bits (per tensor, symmetric).")
    ] = 8,
    format: Annotated[
        Format, typer.Option(rich_help_panel="Quantization", help="int8, or fp8 (E4M3, for Ada/Hopper GPUs).")
    ] = Format.int8,
    target: Annotated[
        Optional[list[Target]],
        typer.Option(
            rich_help_panel="Quantization",
            help="Placement profile(s), one graph each from the same calibration (repeatable): tensorrt (default), "
            "onnxruntime-cpu (U8S8 integer kernels on onnxruntime's CPU provider).",
        ),
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(
            rich_help_panel="Quantization", help="Float compute and Q/DQ scales: fp32, or fp16 for FP16 engines."
        ),
    ] = Precision.fp32,
    correction: Annotated[
        Correction,
        typer.Option(
            rich_help_panel="Corrections", help="Per-timestep correction terms applied by the sampler's host loop."
        ),
    ] = Correction.none,
    correction_per_branch: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Corrections",
            help="Guided sampling: fit the correction terms to both branches' outputs instead of the guided estimate.",
        ),
    ] = False,
    fp8_attention: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Quantization",
            help="With --format fp8: Q/DQ on the attention matmuls too (TensorRT's FP8 fused MHA; head_dim % 16 == 0).",
        ),
    ] = False,
    residual_qdq: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Quantization",
            help="Q/DQ on the skip input of ResNet residual Adds (TensorRT fuses Conv+Add).",
        ),
    ] = True,
    steps: Annotated[
        int, typer.Option(rich_help_panel="Sampler", help="Sampler steps for calibration trajectories and evaluation.")
    ] = 25,
    scheduler: Annotated[
        Scheduler, typer.Option(rich_help_panel="Sampler", help="Sampler for trajectories and evaluation.")
    ] = Scheduler.ddim,
    eta: Annotated[float, typer.Option(rich_help_panel="Sampler", help="DDIM eta (0: deterministic).")] = 0.0,
    karras_sigmas: Annotated[
        bool, typer.Option(rich_help_panel="Sampler", help="Karras sigmas (dpm-solver++, euler, unipc).")
    ] = False,
    sampler: Annotated[
        Optional[list[str]],
        typer.Option(
            rich_help_panel="Sampler",
            help="A sampler the bundle stores, SCHEDULER:STEPS[:karras][:eta=E] such as ddim:25 or "
            "dpm-solver++:20:karras "
            "(repeatable; the first is calibrated for and is the default; instead of --scheduler/--steps/--eta).",
        ),
    ] = None,
    prompts_file: Annotated[
        Optional[Path],
        typer.Option(
            rich_help_panel="Conditioning",
            help="Conditional models: calibration prompts, one per line, encoded by the pipeline's own text "
            "encoder(s).",
        ),
    ] = None,
    conditioning: Annotated[
        Optional[Path],
        typer.Option(
            rich_help_panel="Conditioning",
            help="Conditional models: precomputed conditioning (.safetensors from `stepquant encode-prompts`).",
        ),
    ] = None,
    classes: Classes = None,
    guidance_scale: Annotated[
        float,
        typer.Option(
            rich_help_panel="Sampler",
            help="Classifier-free guidance of the calibration and evaluation sampling (Stable Diffusion: 7.5; 1: "
            "none).",
        ),
    ] = 1.0,
    batch_range: Annotated[
        str,
        typer.Option(
            rich_help_panel="Shapes", help="Network batch range min:opt:max (with guidance, twice the images)."
        ),
    ] = "1:8:64",
    height_range: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Shapes", help="Latent height range min:opt:max (default: the model's size only)."
        ),
    ] = None,
    width_range: Annotated[
        Optional[str],
        typer.Option(rich_help_panel="Shapes", help="Latent width range min:opt:max (default: the model's size only)."),
    ] = None,
    sequence_range: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Shapes", help="Text token range min:opt:max (default: the conditioning's length)."
        ),
    ] = None,
    calib_samples: Annotated[
        int, typer.Option(rich_help_panel="Calibration", help="Calibration trajectories (seeded noise samples).")
    ] = 64,
    calib_batch: Annotated[
        int,
        typer.Option(
            rich_help_panel="Calibration",
            help="Seeds per calibration trajectory batch; under torchrun each process takes whole batches.",
        ),
    ] = CalibrationConfig.batch,
    calib_steps: Annotated[
        Optional[int],
        typer.Option(rich_help_panel="Calibration", help="Sampler steps kept per trajectory (default: all)."),
    ] = None,
    calibrator: Annotated[
        Calibrator,
        typer.Option(
            rich_help_panel="Calibration",
            help="minmax/percentile/mse: activation ranges only; reconstruct: + learned rounding and step sizes per "
            "block; "
            "multistep / mixed-order: + a network stage over n sampler steps / towards the FP second-order direction.",
        ),
    ] = Calibrator.minmax,
    percentile: Annotated[
        float, typer.Option(rich_help_panel="Calibration", help="Percentile of |x| for --calibrator percentile.")
    ] = 99.99,
    recon_iters: Annotated[
        int, typer.Option(rich_help_panel="Calibration", help="Reconstruction iterations per block.")
    ] = ReconstructionConfig.iters,
    recon_scale_lr: Annotated[
        float,
        typer.Option(
            rich_help_panel="Calibration", help="Step-size learning rate of reconstruction, relative to each step size."
        ),
    ] = ReconstructionConfig.scale_lr,
    multistep_steps: Annotated[
        int, typer.Option(rich_help_panel="Calibration", help="Consecutive sampler steps per multistep objective (n).")
    ] = ReconstructionConfig.multistep_steps,
    split_skip_concat: Annotated[
        Optional[bool],
        typer.Option(
            rich_help_panel="Quantization",
            help="Own quantizers for h and skip in decoder layers that concatenate the two (default: on for "
            "reconstruction calibrators).",
        ),
    ] = None,
    timestep_groups: Annotated[
        int,
        typer.Option(
            rich_help_panel="Calibration",
            help="Graphs with their own activation scales, split where ranges change most.",
        ),
    ] = 1,
    steps_per_group: Annotated[
        Optional[int],
        typer.Option(
            rich_help_panel="Calibration", help="Instead of --timestep-groups: a new graph every N sampler steps."
        ),
    ] = None,
    exclude: Annotated[
        Optional[list[str]],
        typer.Option(rich_help_panel="Quantization", help="Extra layer-name regex to keep in FP (repeatable)."),
    ] = None,
    default_excludes: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Quantization", help="Apply the default exclusions (embeddings, conv_in/out, shortcuts)."
        ),
    ] = True,
    seed: Annotated[
        int, typer.Option(rich_help_panel="Calibration", help="Seed of calibration and evaluation noise.")
    ] = 0,
    eval_samples: Annotated[
        int, typer.Option(rich_help_panel="Output and checks", help="Seeds sampled to report PSNR to FP.")
    ] = 256,
    engine: Annotated[
        bool, typer.Option(rich_help_panel="Device", help="Also build the TensorRT engine (needs TensorRT here).")
    ] = False,
    allow_parity_failure: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Output and checks",
            help="Keep a bundle whose layer-wise parity check fails (recorded as failed).",
        ),
    ] = False,
    device: Annotated[
        str,
        typer.Option(
            rich_help_panel="Device",
            help="Where torch runs (trajectories, calibration, reconstruction, corrections, FP samples): auto, cpu, "
            "cuda, cuda:N.",
        ),
    ] = "auto",
    dtype: Annotated[
        FpDtype,
        typer.Option(
            rich_help_panel="Device", help="Float type of the FP reference on --device (quantizers stay float32)."
        ),
    ] = FpDtype.float32,
    overwrite: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Model",
            help="Replace an existing bundle at --out (only a stepquant bundle; never the current directory or the "
            "model's).",
        ),
    ] = False,
    sign_key: SignKey = None,
    progress: Annotated[bool, typer.Option(rich_help_panel="Output and checks", help="Show progress bars.")] = True,
) -> None:
    """Calibrate, quantize and export a diffusion model into a bundle (Q/DQ ONNX, manifest, parity data)."""
    patterns = (DEFAULT_EXCLUDE if default_excludes else ()) + tuple(exclude or ())
    samplers = _samplers(sampler, SamplerConfig(scheduler.value, steps, eta, guidance_scale, karras_sigmas))
    split = calibrator.value in RECONSTRUCTION_CALIBRATORS if split_skip_concat is None else split_skip_concat
    config = ExportConfig(
        model=model,
        out=out,
        quant=QuantSpec(weight_bits, act_bits, patterns, format.value, residual_qdq, split, fp8_attention),
        sampler=samplers[0],
        more_samplers=samplers[1:],
        calibration=CalibrationConfig(
            calibrator=calibrator.value,
            percentile=percentile,
            samples=calib_samples,
            batch=calib_batch,
            steps=calib_steps,
            reconstruction=ReconstructionConfig(
                iters=recon_iters, scale_lr=recon_scale_lr, multistep_steps=multistep_steps
            ),
            timestep_groups=timestep_groups,
            steps_per_group=steps_per_group,
        ),
        correction=CorrectionConfig(method=correction.value, per_branch=correction_per_branch),
        conditioning=ConditioningConfig(prompts_file=prompts_file, file=conditioning, classes=parse_classes(classes)),
        checks=ChecksConfig(eval_samples=eval_samples, require_parity=not allow_parity_failure),
        precision=precision.value,
        targets=tuple(t.value for t in target or [Target.tensorrt]),
        shapes=ShapeProfile(
            *(DimRange.parse(r) if r else None for r in (batch_range, height_range, width_range, sequence_range))
        ),
        seed=seed,
        device=device,
        dtype=dtype.value,
        engine=engine,
        sign_key=sign_key,
        overwrite=overwrite,
        progress=progress,
    )
    try:
        report = export_quantized(config)
    finally:
        distributed.shutdown()
    if report is not None:  # rank 0 (or the only process) reports; other torchrun ranks write nothing
        _print_report(report, config)
