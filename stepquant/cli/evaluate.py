"""`stepquant eval`: quality against FP from the same noise."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from stepquant.bundle import load_bundle
from stepquant.cli.choices import Provider, RuntimeBackend, Scheduler
from stepquant.cli.options import (
    BackendOption,
    Classes,
    CorrectionsOption,
    DeviceOption,
    EngineOption,
    ProviderOption,
    StoredSamplerOption,
    TrustKey,
    parse_classes,
    sampler_request,
)
from stepquant.eval.evaluate import evaluate
from stepquant.eval.plots import plot_errors
from stepquant.runtime.bundle_backends import bundle_corrections, bundle_sampler, quantized_backend, reference_backend
from stepquant.runtime.guidance import choose_conditioning
from stepquant.runtime.sampler import SamplerConfig

DIGIT_SHAPE = (1, 16, 16)
MAX_EVAL_SAMPLES = 16384  # the metrics hold every sample and its features at once


def eval_command(
    bundle: Annotated[
        Path, typer.Option(help="Bundle to evaluate (its Q/DQ graph against its FP graph, both on onnxruntime).")
    ],
    n: Annotated[
        int,
        typer.Option(
            min=2,
            max=MAX_EVAL_SAMPLES,
            help="Number of seeds (0 .. n-1); at least 2, for "
            "Fréchet distances' covariance; every sample is held for the metrics.",
        ),
    ] = 1024,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Sampler steps (default: the bundle's).")] = None,
    eta: Annotated[Optional[float], typer.Option(help="DDIM eta (default: the bundle's).")] = None,
    scheduler: Annotated[
        Optional[Scheduler],
        typer.Option(help="Sampler (default: the bundle's; another one is captured from the bundle's noise schedule)."),
    ] = None,
    sampler: StoredSamplerOption = None,
    guidance_scale: Annotated[
        Optional[float],
        typer.Option(help="Classifier-free guidance scale (default: the bundle's calibration scale)."),
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option(help="Directory for eval.json and errors.png (default: BUNDLE-eval).")
    ] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="onnxruntime intra-op threads.")] = None,
    backend: BackendOption = RuntimeBackend.onnxruntime,
    provider: ProviderOption = Provider.cpu,
    device: DeviceOption = "CPU",
    engine: EngineOption = None,
    corrections: CorrectionsOption = True,
    classes: Classes = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    trust_key: TrustKey = None,
) -> None:
    """Quality of a bundle against FP from the same noise: PSNR, Fréchet distances, classifier (and, for
    class-conditional digits, accuracy against the requested class), error per step."""
    loaded = load_bundle(bundle, trust_key)
    manifest = loaded.manifest
    config = _sampler(loaded, sampler, scheduler and scheduler.value, steps, eta, guidance_scale)
    if manifest.text_to_image is not None:
        _eval_text_to_image(
            loaded,
            n,
            config,
            out,
            threads,
            progress,
            backend=backend.value,
            engine=engine,
            corrections=corrections,
            provider=provider.value,
            device=device,
        )
        return
    if manifest.sample_space == "latent" or (manifest.conditions and manifest.class_table is None):
        raise ValueError(
            "stepquant eval scores digit samples (the demo's classifier and pixel-space metrics); this bundle is "
            "a conditional latent model: its manifest holds latent PSNR to FP, and `stepquant sample` runs it"
        )
    if tuple(manifest.sample_shape) != DIGIT_SHAPE:
        raise ValueError(
            f"stepquant eval scores 16x16 grey digits (the demo's classifier); this bundle samples "
            f"{'x'.join(map(str, manifest.sample_shape))}: `stepquant sample` runs it"
        )
    requested = parse_classes(classes)
    rows = choose_conditioning(
        manifest.conditions,
        f"bundle {bundle}",
        classes=requested,
        class_table=loaded.file(manifest.class_table) if manifest.class_table else None,
    )
    if rows is not None and requested is None:
        requested = tuple(range(len(rows)))
    terms = bundle_corrections(loaded, config) if corrections else None
    result = evaluate(
        reference_backend(loaded, threads),
        quantized_backend(loaded, threads, backend.value, engine, provider=provider.value, device=device),
        manifest.noise_schedule,
        range(n),
        manifest.sample_shape,
        config,
        progress=progress,
        corrections=terms,
        conditioning=rows,
        requested=None if rows is None else [requested[i % len(requested)] for i in range(n)],
    )
    out = out or bundle.with_name(bundle.name + "-eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(
        json.dumps({"bundle": str(bundle), "sampler": asdict(config), **result.to_dict()}, indent=2)
    )
    plot_errors(result, out / "errors.png", title=f"{bundle.name}: {n} samples, {config.describe()}")
    rows = [
        ("PSNR to FP (dB, mean / min)", f"{result.psnr_to_fp_db:.2f} / {result.psnr_to_fp_db_min:.2f}"),
        ("FD to FP", f"{result.fd_to_fp:.3f}"),
        ("FD to data (quantized / FP)", f"{result.fd_to_data:.3f} / {result.fp_fd_to_data:.3f}"),
        ("label agreement with FP", f"{result.label_agreement:.3f}"),
        ("confidence (quantized / FP)", f"{result.confidence:.3f} / {result.fp_confidence:.3f}"),
        ("recognisable (quantized / FP)", f"{result.recognisable:.3f} / {result.fp_recognisable:.3f}"),
        *(
            [("requested class (quantized / FP)", f"{result.class_accuracy:.3f} / {result.fp_class_accuracy:.3f}")]
            if result.class_accuracy is not None
            else []
        ),
        (
            "final accumulated / mean per-step error",
            f"{result.accumulated_error[-1]:.4f} / {np.mean(result.step_error):.4f}",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    print(
        f"{bundle} on {backend.value}, corrections {terms.method if terms else 'none'}: {n} samples, "
        f"{config.describe()}"
    )
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    print(f"wrote {out / 'eval.json'} and {out / 'errors.png'}")


def _sampler(
    loaded, spec: str | None, scheduler: str | None, steps: int | None, eta: float | None, guidance: float | None
) -> SamplerConfig:
    """A stored sampler (--sampler), else the bundle's default with --scheduler/--steps/--eta replaced (another
    scheduler is captured from the bundle's noise schedule), at --guidance-scale where given."""
    requested = sampler_request(spec, scheduler=scheduler, steps=steps, eta=eta)
    config = bundle_sampler(loaded, **requested) if spec else bundle_sampler(loaded).overridden(**requested)
    return config.overridden(guidance_scale=guidance)


def _eval_text_to_image(
    loaded,
    n: int,
    config: SamplerConfig,
    out: Path | None,
    threads: int | None,
    progress: bool,
    **runtime,
) -> None:
    """A whole-pipeline bundle of demo-digits-sd: its images, FP against quantized, on its own prompts."""
    from stepquant.eval.text_to_image import score_coloured_digits
    from stepquant.models.loading import TEXT_TO_IMAGE_DEMO_NAME

    if (
        loaded.manifest.source_model != TEXT_TO_IMAGE_DEMO_NAME
        and Path(loaded.manifest.source_model).name != "demo_digits_sd"
    ):
        raise ValueError(
            f"stepquant eval scores text-to-image bundles of {TEXT_TO_IMAGE_DEMO_NAME} (its digit and colour "
            f"checks); this one is of {loaded.manifest.source_model}: its manifest holds image PSNR to FP, "
            "and `stepquant generate --graph reference` gives FP images to compare"
        )
    scores = score_coloured_digits(loaded, n, config, threads, progress, **runtime)
    out = out or loaded.path.with_name(loaded.path.name + "-eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(
        json.dumps({"bundle": str(loaded.path), "sampler": asdict(config), **scores.to_dict()}, indent=2)
    )
    print(
        f"{loaded.path} on {runtime['backend']}: {n} prompts, one seed each, {config.describe()}, guidance "
        f"{config.guidance_scale:g}"
    )
    print(f"  image PSNR to FP (dB)            {scores.psnr_to_fp_db:.2f}")
    print(f"  FD to FP                         {scores.fd_to_fp:.3f}")
    print(f"  requested digit (quantized / FP) {scores.digit_accuracy:.3f} / {scores.fp_digit_accuracy:.3f}")
    print(f"  requested colours (quantized / FP) {scores.colour_accuracy:.3f} / {scores.fp_colour_accuracy:.3f}")
    print(f"wrote {out / 'eval.json'}")
