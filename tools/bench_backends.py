"""Every CPU backend on the same bundles, in one run: `stepquant bench` (per-forward latency of the FP32 graph
and of each quantized graph on onnxruntime and OpenVINO, with the ratios to OpenVINO FP32 and onnxruntime FP32)
and, for the demo, `stepquant eval --backend X` (PSNR to FP as each engine computes it).

Bundles: the demo exported with both targets at default options, and a UNet2DModel with the architecture
of google/ddpm-cifar10-32 (random weights, built from its config; speed only, so calibrated briefly).

    python tools/bench_backends.py [--threads 2] [--work DIR] [--smoke] [--no-write]
        (writes docs/benchmarks/backends.md)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchdoc import SMOKE_EXPORT, console, header, work_folder, write_section

TARGETS = ["--target", "tensorrt", "--target", "onnxruntime-cpu"]


def export(model: str, out: Path, *options: str) -> Path:
    if not (out / "manifest.json").exists():
        console("export-quantized", "--model", model, "--out", str(out), *TARGETS, "--no-progress", *options)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="keep the bundles here (default: a temporary folder)")
    parser.add_argument(
        "--smoke", action="store_true", help="the demo only, few steps and seeds: checks the script runs"
    )
    parser.add_argument("--no-write", action="store_true", help="print without updating its docs/benchmarks page")
    args = parser.parse_args()
    work = work_folder(args.work, "bench-backends-")
    quick = SMOKE_EXPORT if args.smoke else ()
    bundles = {"demo-digits": export("demo-digits", work / "demo", *quick)}
    if not args.smoke:
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

        from stepquant.models.reference_configs import DDPM_CIFAR10_UNET

        model = work / "cifar10-model"
        if not model.exists():
            DDPMPipeline(unet=UNet2DModel(**DDPM_CIFAR10_UNET), scheduler=DDPMScheduler()).save_pretrained(model)
        bundles["cifar10 UNet (random weights)"] = export(
            str(model), work / "cifar10", "--calib-samples", "8", "--steps", "10", "--eval-samples", "8"
        )
    lines = [header(), f"{args.threads} threads; onnxruntime and OpenVINO as installed here.", ""]
    for name, bundle in bundles.items():
        batches = ["--batch", "1", "--seconds", "0.2"] if args.smoke else ["--batch", "1", "--batch", "8"]
        lines += [
            f"### {name}",
            "",
            f"`stepquant bench --bundle {bundle.name} --threads {args.threads} {' '.join(batches)}`",
            "",
            "```",
            console("stepquant", "bench", "--bundle", str(bundle), "--threads", str(args.threads), *batches).rstrip(),
            "```",
            "",
        ]
    n = "8" if args.smoke else "256"
    lines += [f"### PSNR to FP per backend (demo-digits, {n} seeds)", ""]
    for backend in ("onnxruntime", "openvino"):
        out = console(
            "stepquant",
            "eval",
            "--bundle",
            str(bundles["demo-digits"]),
            "--backend",
            backend,
            "--n",
            n,
            "--no-progress",
            "--out",
            str(work / f"eval-{backend}"),
        )
        psnr = next(line for line in out.splitlines() if "PSNR to FP" in line).split()[-3:]
        lines.append(f"- `stepquant eval --backend {backend} --n {n}`: {' '.join(psnr)} dB (mean / min)")
    print("\n".join(lines))
    if not args.smoke and not args.no_write:
        write_section("backends", "\n".join(lines))


if __name__ == "__main__":
    main()
