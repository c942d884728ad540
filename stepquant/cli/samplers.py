"""`stepquant add-sampler`: store one more sampler in an exported bundle, without recalibrating."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stepquant.bundle import Bundle, load_bundle
from stepquant.bundle.reader import SIGNATURE
from stepquant.cli.choices import Scheduler
from stepquant.cli.options import Classes, SignKey, TrustKey, parse_classes, sampler_request
from stepquant.export.samplers import add_sampler
from stepquant.runtime.guidance import Conditioning, choose_conditioning, read_prompts
from stepquant.runtime.sampler import SamplerConfig
from stepquant.runtime.text_to_image import GenerateRequest, PromptEncoder, text_conditioning


def _conditioning(
    bundle: Bundle, classes: tuple[int, ...] | None, conditioning: Path | None, prompts_file: Path | None
) -> Conditioning | None:
    """What the new sampler's correction terms are fitted and its quality measured under: the bundle's class
    table (the classes it was exported with, unless --classes says otherwise), a conditioning file, or prompts
    through the bundle's own text encoder; None for an unconditional bundle, or a conditional one given nothing
    and without terms to fit (its quality is then not measured)."""
    manifest = bundle.manifest
    given = classes is not None or conditioning is not None or prompts_file is not None
    if not manifest.conditions:
        if given:
            raise typer.BadParameter("this bundle is unconditional: drop --classes / --conditioning / --prompts-file")
        return None
    if not given and not manifest.class_table and manifest.correction_method == "none":
        return None
    if prompts_file is not None:
        if manifest.text_to_image is None:
            raise typer.BadParameter(
                "--prompts-file needs a whole-pipeline bundle (its text encoder encodes them); pass --conditioning",
                param_hint="--prompts-file",
            )
        if classes is not None or conditioning is not None:
            raise typer.BadParameter("give one of --prompts-file, --conditioning and --classes")
        return text_conditioning(bundle, PromptEncoder(bundle), GenerateRequest(tuple(read_prompts(prompts_file))))
    exported = (manifest.info.get("conditioning") or {}).get("classes")
    table = bundle.file(manifest.class_table) if manifest.class_table else None
    return choose_conditioning(
        manifest.conditions,
        f"bundle {bundle.path}",
        conditioning,
        classes if classes is not None or table is None else exported,
        table,
        missing="pass the conditioning it was exported with: --conditioning or --prompts-file",
    )


def add_sampler_command(
    bundle: Annotated[
        Path, typer.Option(rich_help_panel="Input", help="Bundle to add the sampler to (rewritten atomically).")
    ],
    sampler: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel="Sampler",
            help="The sampler, SCHEDULER:STEPS[:karras][:eta=E], e.g. euler:30 (or give --scheduler and --steps).",
        ),
    ] = None,
    scheduler: Annotated[
        Optional[Scheduler], typer.Option(rich_help_panel="Sampler", help="Scheduler of the sampler to add.")
    ] = None,
    steps: Annotated[Optional[int], typer.Option(rich_help_panel="Sampler", min=1, help="Its steps.")] = None,
    eta: Annotated[Optional[float], typer.Option(rich_help_panel="Sampler", help="DDIM eta.")] = None,
    karras_sigmas: Annotated[Optional[bool], typer.Option(rich_help_panel="Sampler", help="Karras sigmas.")] = None,
    classes: Classes = None,
    conditioning: Annotated[
        Optional[Path],
        typer.Option(
            rich_help_panel="Conditioning",
            help="Conditional bundles with corrections: the conditioning the terms are fitted under (.safetensors).",
        ),
    ] = None,
    prompts_file: Annotated[
        Optional[Path],
        typer.Option(
            rich_help_panel="Conditioning",
            help="Whole-pipeline bundles with corrections: prompts (one per line) encoded by the bundle's text "
            "encoder.",
        ),
    ] = None,
    trust_key: TrustKey = None,
    sign_key: SignKey = None,
    drop_signature: Annotated[
        bool,
        typer.Option(
            rich_help_panel="Output and checks",
            help="A signed bundle without --sign-key: drop its signature (the manifest changes, so the old one would "
            "not verify).",
        ),
    ] = False,
    eval_samples: Annotated[
        Optional[int],
        typer.Option(
            rich_help_panel="Output and checks",
            min=1,
            help="Seeds its PSNR to FP is measured on (default: the export's).",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(rich_help_panel="Output and checks", help="Show progress bars.")] = True,
) -> None:
    """Store one more sampler in a bundle: its scheduler table and, where the bundle has correction terms, terms
    fitted for it from the bundle's own FP and quantized graphs. The graphs and their scales stay as exported."""
    if sampler is None and (scheduler is None or steps is None):
        raise typer.BadParameter("give --sampler SCHEDULER:STEPS, or --scheduler and --steps", param_hint="--sampler")
    requested = sampler_request(
        sampler, scheduler=scheduler and scheduler.value, steps=steps, eta=eta, karras_sigmas=karras_sigmas
    )
    try:
        config = SamplerConfig().overridden(**requested)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--sampler") from None
    loaded = load_bundle(bundle, trust_key)
    signed = (loaded.path / SIGNATURE).exists()
    if signed and sign_key is None and not drop_signature:
        raise ValueError(
            f"bundle {bundle} is signed and its manifest changes: pass --sign-key to sign it again, or --drop-signature"
        )
    rows = _conditioning(loaded, parse_classes(classes), conditioning, prompts_file)
    extended = add_sampler(loaded, config, rows, sign_key, progress, eval_samples)
    stored = ", ".join(entry.sampler.spec for entry in extended.manifest.samplers)
    fitted = f" with {loaded.manifest.correction_method} terms" if loaded.manifest.correction_method != "none" else ""
    print(
        f"added {config.spec}{fitted} to {bundle}; it stores {stored}"
        + ("; manifest signed again" if sign_key else "; the bundle is now unsigned" if signed else "")
    )
    quality = extended.manifest.samplers[-1].quality
    print(
        f"  quality: PSNR to FP {quality['psnr_to_fp_db_mean']:.2f} dB mean, {quality['psnr_to_fp_db_min']:.2f} dB min "
        f"({quality['space']}s), over {quality['samples']} seeds, against {quality['fp']}"
        if quality
        else "  quality: not measured (a conditional bundle: pass --conditioning or --prompts-file to measure it)"
    )
