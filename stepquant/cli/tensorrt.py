"""The TensorRT commands: `stepquant lint`, `stepquant parity`, `stepquant build-engine`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from stepquant.bundle import load_bundle
from stepquant.bundle.reader import SIGNATURE
from stepquant.bundle.targets import TENSORRT
from stepquant.cli.choices import ParityBackend
from stepquant.cli.options import SignKey, TrustKey
from stepquant.export.bundle import extend_bundle
from stepquant.export.lint import lint
from stepquant.export.parity import replay_parity
from stepquant.export.pipeline_parts import part_input_shapes
from stepquant.export.shapes import DimRange, ShapeProfile
from stepquant.export.tensorrt import build_engines
from stepquant.runtime.bundle_backends import plan_file
from stepquant.runtime.tensorrt_backend import tensorrt_version


def lint_command(
    model: Annotated[Path, typer.Argument(help="A Q/DQ ONNX model, or a bundle directory (its tensorrt graphs).")],
    trust_key: TrustKey = None,
) -> None:
    """Check Q/DQ ONNX graphs against TensorRT's explicit-quantization rules; exit 1 on any finding."""
    if model.is_dir():
        loaded = load_bundle(model, trust_key)
        paths = [loaded.file(graph) for graph in loaded.target(TENSORRT.name).graphs]
    elif model.is_file():
        paths = [model]
    else:
        raise ValueError(f"{model} not found")
    failed = False
    for path in paths:
        findings = lint(path)
        for finding in findings:
            print(finding)
        print(
            f"{path}: {len(findings)} TensorRT rule violation(s)"
            if findings
            else f"{path}: conforms to TensorRT's Q/DQ rules"
        )
        failed = failed or bool(findings)
    if failed:
        raise typer.Exit(1)


def parity_command(
    bundle: Annotated[Path, typer.Option(help="Bundle whose saved parity inputs to replay.")],
    backend: Annotated[
        ParityBackend,
        typer.Option(
            help="Engine to check: onnxruntime (end to end and segment by segment), openvino (segment by "
            "segment), tensorrt (end to end)."
        ),
    ] = ParityBackend.onnxruntime,
    rtol: Annotated[
        Optional[float],
        typer.Option(
            help="Tolerance on the median relative error of 'eps' at each input, in [0, 1) (default: the replay "
            "tolerance recorded at export)."
        ),
    ] = None,
    engine: Annotated[Optional[Path], typer.Option(help="TensorRT engine (default: the bundle's model.plan).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    trust_key: TrustKey = None,
) -> None:
    """Check the engine this machine runs against the bundle's saved parity data; exit 1 on failure. End to end,
    the saved inputs replayed against the saved fake-quant torch outputs; segment by segment (onnxruntime,
    OpenVINO), every layer compiled on its own and fed the reference codes, which catches one scale 2% off
    where an end-to-end error cannot tell it from the engine's own rounding."""
    if rtol is not None and not 0.0 <= rtol < 1.0:  # also refuses nan: at 1 or more a median error passes anything
        raise typer.BadParameter(f"must be a median relative error in [0, 1), got {rtol}", param_hint="'--rtol'")
    loaded = load_bundle(bundle, trust_key)
    passed = True
    if backend.value in REPLAYED:
        passed = _replay(loaded, bundle, backend.value, rtol, engine)
    else:
        print(f"{bundle}: no end-to-end replay on {backend.value} (its fused kernels round unlike the simulation)")
    if backend.value in SEGMENTED:
        passed = _segments(loaded, backend.value, progress) and passed
    else:
        print(f"  segments: not on {backend.value} (an engine exposes no layer's codes); replay only")
    print("parity: PASS" if passed else "parity: FAIL")
    if not passed:
        raise typer.Exit(1)


REPLAYED = ("onnxruntime", "tensorrt")  # engines Polygraphy runs
SEGMENTED = ("onnxruntime", "openvino")  # engines that compile a graph's segments on their own


def _replay(loaded, bundle: Path, backend: str, rtol: float | None, engine: Path | None) -> bool:
    report = replay_parity(loaded, backend, rtol, engine)
    target = loaded.target(loaded.target_for(backend))
    print(
        f"{bundle}: end-to-end replay: {backend} running the {loaded.target_for(backend)} graph on the saved "
        "inputs against the saved fake-quant torch outputs (tolerance: median relative error <= "
        f"{report.tolerance_median_rel:.2g})"
    )
    print(
        f"  at export: layer-wise check {'PASS' if target.parity['passed'] else 'FAIL'}, end-to-end worst median "
        f"{max(t['median_reldiff'] for t in target.parity['end_to_end']['timesteps']):.2e}"
    )
    print(
        f"  {'timestep':>8}  {'median rel':>10}  {'p' + str(round(100 * report.error_quantile)) + ' rel':>10}  "
        f"{'max abs':>10}"
    )
    for t in report.timesteps:
        print(
            f"  {t.timestep:8.0f}  {t.median_reldiff:10.2e}  {t.quantile_reldiff:10.2e}  {t.max_absdiff:10.2e}  "
            f"{'PASS' if t.passed else 'FAIL'}"
        )
    return report.passed


def _segments(loaded, backend: str, progress: bool) -> bool:
    from tqdm import tqdm

    from stepquant.export.segments import check_bundle_segments

    def bar(items):
        return tqdm(items, desc="segments", unit="segment", disable=not progress, leave=False)

    passed = True
    for graph, report in check_bundle_segments(loaded, backend, progress=bar):
        print(f"  segments: {graph} on {backend}, fed onnxruntime's codes as written: {report.summary()}")
        passed = passed and report.passed
    return passed


def build_engine_command(
    bundle: Annotated[Path, typer.Option(help="Bundle to build the TensorRT engine for (on this machine's GPU).")],
    batch_range: Annotated[
        Optional[str],
        typer.Option(
            help="Batch range min:opt:max of the optimisation profile (default: the bundle's declared range)."
        ),
    ] = None,
    trust_key: TrustKey = None,
    sign_key: SignKey = None,
) -> None:
    """Build a strongly typed TensorRT engine from the bundle's Q/DQ graph and add it to the bundle; the
    other dimensions' ranges are the ones declared at export (the graph accepts no others). The manifest
    changes, so a signature is dropped unless --sign-key signs the new one."""
    loaded = load_bundle(bundle, trust_key)
    manifest = loaded.manifest
    profile = ShapeProfile.from_dict(manifest.shape_profile)
    if batch_range:
        profile = replace(profile, batch=DimRange.parse(batch_range))
    version = tensorrt_version()  # a clear error before anything is staged

    shapes = profile.input_shapes(manifest.sample_shape[0], manifest.conditions)
    graphs = {graph: shapes for graph in loaded.target(TENSORRT.name).graphs}
    if manifest.text_to_image is not None:  # the text encoders and VAE decoder get engines of their own shapes
        graphs |= part_input_shapes(manifest.text_to_image, profile, manifest.sample_shape[0])
    engine = {
        **manifest.engine,
        "plans": [plan_file(g) for g in graphs],
        "input_shapes": shapes,
        "tensorrt_version": version,
    }
    extended = extend_bundle(
        loaded, lambda staging: build_engines(staging, graphs), replace(manifest, engine=engine), sign_key
    )
    print(
        f"built {', '.join(engine['plans'])} in {extended.path} with TensorRT {version}"
        + (
            "; manifest signed again"
            if sign_key
            else "; the bundle is now unsigned (pass --sign-key to sign it)"
            if (loaded.path / SIGNATURE).exists() or trust_key
            else ""
        )
    )
