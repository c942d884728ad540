"""Options several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stepquant.cli.choices import Provider, RuntimeBackend
from stepquant.runtime.sampler import SamplerConfig

BackendOption = Annotated[
    RuntimeBackend,
    typer.Option(
        "--backend",
        rich_help_panel="Backend",
        help="What runs the bundle's graphs; auto: TensorRT where its engines are built, else onnxruntime-gpu's "
        "CUDA provider, else onnxruntime where the bundle has the onnxruntime-cpu graph, else OpenVINO, else "
        "onnxruntime on the CPU.",
    ),
]
ProviderOption = Annotated[
    Provider,
    typer.Option(
        "--provider",
        rich_help_panel="Backend",
        help="onnxruntime's execution provider (cuda and tensorrt need onnxruntime-gpu in place of onnxruntime).",
    ),
]
DeviceOption = Annotated[
    str,
    typer.Option(
        "--device", rich_help_panel="Backend", help="OpenVINO's device for --backend openvino: CPU, GPU, NPU or AUTO."
    ),
]

EngineOption = Annotated[
    Optional[Path],
    typer.Option(
        "--engine", rich_help_panel="Backend", help="TensorRT engine for --backend tensorrt (default: the bundle's)."
    ),
]
CorrectionsOption = Annotated[
    bool,
    typer.Option(
        "--corrections/--no-corrections",
        rich_help_panel="Sampler",
        help="Apply the bundle's per-timestep correction terms, if it has them.",
    ),
]
TrustKey = Annotated[
    Optional[Path],
    typer.Option(
        rich_help_panel="Input",
        help="Refuse the bundle unless its manifest is signed by this Ed25519 public key (from `stepquant keygen`).",
    ),
]
SignKey = Annotated[
    Optional[Path],
    typer.Option(
        rich_help_panel="Output and checks",
        help="Sign the bundle's manifest with this Ed25519 private key (from `stepquant keygen`).",
    ),
]
Classes = Annotated[
    Optional[str],
    typer.Option(
        rich_help_panel="Conditioning",
        help="Class-conditional models (demo-digits-cond): class indices, e.g. 0,1,7; sample i asks for classes[i mod "
        "len] "
        "(default: every class in turn).",
    ),
]


def parse_classes(value: str | None) -> tuple[int, ...] | None:
    """'0,1,7' -> (0, 1, 7); one line naming what is not a class index."""
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",")]
    bad = next((part for part in parts if not (part.isascii() and part.isdigit())), None)
    if bad is not None:
        raise typer.BadParameter(
            f"{bad!r} is not a class index (non-negative integers, comma-separated)", param_hint="--classes"
        )
    return tuple(int(part) for part in parts)


StoredSamplerOption = Annotated[
    Optional[str],
    typer.Option(
        "--sampler",
        rich_help_panel="Sampler",
        help="One of the bundle's stored samplers, SCHEDULER:STEPS[:karras][:eta=E] (`stepquant inspect` lists them; "
        "instead of --scheduler/--steps/--eta).",
    ),
]


def sampler_request(spec: str | None, **options) -> dict:
    """The sampler fields a command was given: those of a --sampler spec, or the separate options (None: not
    given); one line when both are."""
    if spec is None:
        return options
    if any(value is not None for value in options.values()):
        raise typer.BadParameter(
            "give --sampler, or --scheduler/--steps/--eta/--karras-sigmas, not both", param_hint="--sampler"
        )
    try:
        parsed = SamplerConfig.parse(spec)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--sampler") from None
    return parsed.fields
