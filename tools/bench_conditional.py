"""Conditional models end to end on the CPU: the tiny random-weight SD-, SDXL- and PixArt-style models of
stepquant.models.tiny exported at W8A8 with classifier-free guidance, dynamic batch / size / text length,
then per parity feed (calibration inputs and the declared ranges' corners) the Q/DQ and FP graphs'
agreement with torch, the latent PSNR of the bundle's guided samples on onnxruntime, and the latency of
FP32 and Q/DQ graphs. Random weights: this checks the machinery, it says nothing of real-model quality.

    python tools/bench_conditional.py [--models sd,sdxl,pixart] [--no-write] [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchdoc import header, parse_options, write_section

from stepquant.bundle import load_bundle
from stepquant.eval.latency import measure_latency
from stepquant.export.config import CalibrationConfig, ChecksConfig, ConditioningConfig
from stepquant.export.shapes import DimRange, ShapeProfile
from stepquant.models import EpsilonModel, load_model
from stepquant.models.tiny import TEXT_TOKENS, random_conditioning, save_tiny_pipeline
from stepquant.pipeline import ExportConfig, export_quantized
from stepquant.runtime import OnnxRuntimeBackend, SamplerConfig

SAMPLER = SamplerConfig(steps=10, guidance_scale=3.0)
SHAPES = ShapeProfile(
    batch=DimRange(1, 4, 8), height=DimRange(8, 8, 16), width=DimRange(8, 8, 12), sequence=DimRange(4, TEXT_TOKENS, 8)
)


def _corner(t) -> str:
    """One corner's parity as the table prints it: timestep@shape median."""
    return f"{t.timestep:g}@{'x'.join(map(str, t.shape))} {t.median_reldiff:.0e}"


def rows_for(kind: str, workdir: Path, eval_samples: int) -> list[str]:
    pipeline = save_tiny_pipeline(kind, workdir / kind)
    conditioning = workdir / f"{kind}.safetensors"
    random_conditioning(EpsilonModel(load_model(str(pipeline)).denoiser), prompts=8).save(conditioning)
    report = export_quantized(
        ExportConfig(
            model=str(pipeline),
            out=workdir / f"{kind}-bundle",
            sampler=SAMPLER,
            shapes=SHAPES,
            progress=False,
            conditioning=ConditioningConfig(file=conditioning),
            calibration=CalibrationConfig(samples=8),
            checks=ChecksConfig(eval_samples=eval_samples, require_parity=False),
        )
    )
    native = [t for t in report.end_to_end.timesteps if t.shape[2:] == [8, 8] and t.shape[0] == 4]
    corners = [t for t in report.end_to_end.timesteps if t not in native]
    bundle = load_bundle(report.bundle)
    latency = []
    for batch in (2, 8):  # one image with guidance, four images with guidance
        fp = measure_latency(
            OnnxRuntimeBackend(bundle.file("model_fp32.onnx"), 2),
            bundle.manifest.sample_shape,
            batch,
            bundle.manifest.conditions,
            TEXT_TOKENS,
        ).median_ms
        qdq = measure_latency(
            OnnxRuntimeBackend(bundle.file("model.onnx"), 2),
            bundle.manifest.sample_shape,
            batch,
            bundle.manifest.conditions,
            TEXT_TOKENS,
        ).median_ms
        latency.append(f"{fp:.1f} / {qdq:.1f}")
    row = (
        f"| {kind} | {sum(p.numel() for p in load_model(str(pipeline)).denoiser.parameters()) / 1e6:.2f}M | "
        f"{report.fp_parity.worst_median_reldiff:.1e} | {max(t.median_reldiff for t in native):.1e} | "
        f"{max(t.median_reldiff for t in corners):.1e} "
        f"({', '.join(_corner(t) for t in corners)}) | "
        f"{report.psnr_mean_db:.2f} | {' | '.join(latency)} |"
    )
    print(row, flush=True)
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd,sdxl,pixart")
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--no-write", action="store_true")
    args = parse_options(parser, models="sd", eval_samples=2)
    rows = [
        "| model | parameters | FP graph vs FP torch, worst median rel | Q/DQ vs simulation end to end, calibration "
        "feeds (batch 4, 8x8) | "
        "Q/DQ vs simulation end to end, range corners (timestep@shape) | latent PSNR to FP (dB) | batch 2 ms FP32 / "
        "Q/DQ | "
        "batch 8 ms FP32 / Q/DQ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            rows += rows_for(kind, Path(tmp), args.eval_samples)
    body = (
        header()
        + f"\nW8A8 minmax, tensorrt profile graph on onnxruntime (CPU, 2 threads); {SAMPLER.steps} DDIM steps, "
        f"guidance {SAMPLER.guidance_scale:g}, 8 calibration trajectories (x2 copies for guidance), "
        f"{args.eval_samples} "
        f"evaluation seeds cycling 8 random prompts; ranges batch 1:4:8, height 8:8:16, width 8:8:12, text 4:6:8.\n\n"
        + "\n".join(rows)
        + "\n"
    )
    if not args.no_write:
        write_section("bench_conditional", body)


if __name__ == "__main__":
    main()
