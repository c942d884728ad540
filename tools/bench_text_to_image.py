"""A prompt to a PNG, measured on the trained mini Stable Diffusion `demo-digits-sd`: image-space quality of
its quantized bundles against FP, and what the device pays (runtime-only install).

Quality: each configuration is exported with default options except the quantization, `--guidance-scale` and
the two samplers it stores (25 DDIM steps, calibrated for, and 20 DPM-Solver++ steps, with its own correction
terms), calibrated on 50 prompts (the export's own quality check on 16 seeds: this script scores them); then, for
each sampler, `stepquant.generate` makes one image for each of N prompts (digit i mod 10, colour pair i mod 30,
wording i mod 5, seed i) at the bench's guidance with the FP32 reference UNet (the FP images, made once: every
bundle's reference graph is the same file) and with the bundle's quantized UNet, both through the bundle's own
text encoder and VAE decoder. Reported: image PSNR to FP (on [-1, 1]), the Fréchet distance of the digit
classifier's features between quantized and FP images, the digit accuracy (the classifier on the decoded
digit's mask) and the colour accuracy (both colours right). One configuration is calibrated without guidance
(`--guidance-scale 1`, the export's default) and run guided: what a default export gives a guided user.
modelopt (`pip install '.[bench]'`): its max calibration (INT8_DEFAULT_CFG at these bits) of the same UNet, fed
the inputs the export's calibration records (the same prompts, seeds and steps, both halves of guided calls),
run as its own torch fake-quant model in place of the bundle's UNet, through the same text encoder and VAE
decoder (the W4A8 minmax bundle's).

Device cost: a fresh runtime-only virtual environment (`pip install .`: numpy, onnxruntime, tokenizers...):
its size and the tokenizers package's share, the cold start of `stepquant generate --n 1` to its PNG, and
seconds per image of each stage (text encoder, denoising loop, VAE decoder) at batch 8.

    python tools/bench_text_to_image.py [--n 500] [--guidance 5] [--no-write] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from bench_install import ROOT, size_mib, venv
from bench_quality import leave_out, modelopt_max
from benchdoc import SMOKE_STEPS, header, publish

from stepquant.bundle import Bundle, load_bundle
from stepquant.calibrators import collect_calibration_set
from stepquant.cli.main import invoke
from stepquant.data.coloured_digits import prompt
from stepquant.eval.text_to_image import (
    coloured_digit_prompts,
    judge_coloured_digits,
    reference_images,
    score_coloured_digits,
)
from stepquant.export.config import CalibrationConfig
from stepquant.models import EpsilonModel, load_model
from stepquant.models.conditioning import load_conditioning
from stepquant.models.denoisers import sample_shape
from stepquant.models.torch_backend import TorchBackend
from stepquant.pipeline import CALIBRATION_SEED_OFFSET
from stepquant.runtime.backend import Backend
from stepquant.runtime.sampler import SamplerConfig

MODEL = "demo-digits-sd"
SAMPLERS = ("ddim:25", "dpm-solver++:20")
W4 = ["--weight-bits", "4"]
MODELOPT = ("W4A8",)  # modelopt rows: the bits the targets compare with
CONFIGS = {  # name -> (export options beyond the defaults, calibration guidance; None: the bench's)
    "W8A8 minmax": ([], None),
    "W8A8 minmax, calibrated unguided": ([], 1.0),
    "W4A8 minmax": (W4, None),
    "W4A8 reconstruct": ([*W4, "--calibrator", "reconstruct"], None),
    "W4A8 reconstruct + D2": ([*W4, "--calibrator", "reconstruct", "--correction", "d2-deterministic"], None),
}
STAGES = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from stepquant.bundle import Bundle, load_bundle
    from stepquant.runtime.bundle_backends import bundle_sampler, bundle_table, quantized_backend
    from stepquant.runtime.guidance import Conditioning
    from stepquant.runtime.sampler import sample_batches
    from stepquant.runtime.text_to_image import LatentDecoder, PromptEncoder
    bundle = load_bundle(sys.argv[1]); count = int(sys.argv[2])
    prompts = [f"a red {w} on a blue background" for w in ("seven", "three", "zero", "one")] * (count // 4)
    config = bundle_sampler(bundle); table = bundle_table(bundle)
    encoder, decoder, unet = PromptEncoder(bundle), LatentDecoder.of(bundle), quantized_backend(bundle)
    times = {}
    start = time.perf_counter()
    rows = Conditioning(encoder(prompts), encoder([""]))
    times["text encoder"] = time.perf_counter() - start
    start = time.perf_counter()
    latents = np.concatenate(list(sample_batches(unet, table, range(count), bundle.manifest.sample_shape, config, count,
                                                 progress=False, conditioning=rows, clip=False)))
    times["denoising loop"] = time.perf_counter() - start
    start = time.perf_counter(); decoder(latents); times["VAE decoder"] = time.perf_counter() - start
    print(json.dumps({k: v / count for k, v in times.items()}))
""")


def export(out: Path, options: list[str], guidance: float, calibration: Path, smoke: bool) -> Path:
    samplers = [f"ddim:{SMOKE_STEPS}"] if smoke else SAMPLERS
    fast = ["--calib-samples", "4", "--eval-samples", "4", "--recon-iters", "20"] if smoke else ["--eval-samples", "16"]
    code, _, err = invoke(
        "export-quantized",
        [
            "--model",
            MODEL,
            "--prompts-file",
            calibration,
            "--guidance-scale",
            guidance,
            "--out",
            out,
            "--no-progress",
            *(option for spec in samplers for option in ("--sampler", spec)),
            *options,
            *fast,
        ],
    )
    if code:
        raise SystemExit(f"export failed: {err.strip()}")
    return out


def score_samplers(
    lines: list[str],
    name: str,
    bundle: Bundle,
    count: int,
    guidance: float,
    fp: dict[str, tuple[str, torch.Tensor]],
    cost: str,
    denoiser: Backend | None = None,
) -> None:
    """One table row per stored sampler of `bundle` (its quantized UNet, or `denoiser` in its place), scored
    against FP images made once per sampler and reference graph (`fp` caches them, with an FP row each)."""
    reference = bundle.manifest.files[bundle.manifest.reference_graph]
    for stored in bundle.manifest.samplers:
        spec = stored.sampler.spec
        config = SamplerConfig.from_record(stored.sampler).overridden(guidance_scale=guidance)
        if fp.get(spec, ("",))[0] != reference:
            fp[spec] = (reference, reference_images(bundle, count, config))
            digit, colour, _ = judge_coloured_digits(fp[spec][1], coloured_digit_prompts(count))
            lines.append(f"| FP (reference UNet) | {spec} | - | - | {digit:.1%} | {colour:.1%} | - |")
        scores = score_coloured_digits(bundle, count, config, fp=fp[spec][1], denoiser=denoiser)
        lines.append(
            f"| {name} | {spec} | {scores.psnr_to_fp_db:.2f} | {scores.fd_to_fp:.3f} | {scores.digit_accuracy:.1%} "
            f"| {scores.colour_accuracy:.1%} | {cost} |"
        )
        print(lines[-1], flush=True)


def modelopt_denoiser(bits: str, guidance: float, calibration: Path, smoke: bool) -> tuple[Backend, float]:
    """modelopt's max calibration of demo-digits-sd's UNet on the inputs the export calibrates on (the first
    sampler's), as bench_quality runs it; returns the fake-quant model and its calibration seconds."""
    loaded = load_model(MODEL)
    fp_model = EpsilonModel(loaded.denoiser)
    samples = 4 if smoke else CalibrationConfig().samples
    sampler = SamplerConfig.parse(f"ddim:{SMOKE_STEPS}" if smoke else SAMPLERS[0], guidance)
    shape = sample_shape(loaded.denoiser)
    conditioning = load_conditioning(fp_model, loaded, calibration, None, shape).at(list(range(samples)))
    seeds = range(CALIBRATION_SEED_OFFSET, CALIBRATION_SEED_OFFSET + samples)
    calib = collect_calibration_set(
        TorchBackend(fp_model), loaded.scheduler_config, seeds, shape, sampler, sampler.steps, False, conditioning
    )
    return modelopt_max(fp_model, calib, bits)


def device_cost(bundle: Path, runs: int, scratch: Path) -> list[str]:
    python = venv(scratch / "runtime", [str(ROOT)])
    site = next((scratch / "runtime" / "lib").glob("python*/site-packages"))
    command = [
        str(python.parent / "stepquant"),
        "generate",
        "--bundle",
        str(bundle),
        "--prompt",
        "a red seven on a blue background",
        "--out",
        str(scratch / "x.png"),
        "--no-progress",
    ]
    subprocess.run(command, check=True, capture_output=True)  # warm the file cache
    cold = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        cold.append(time.perf_counter() - start)
    stages = subprocess.run([str(python), "-c", STAGES, str(bundle), "8"], capture_output=True, text=True)
    if stages.returncode:
        raise SystemExit(f"timing the stages failed: {stages.stderr.strip().splitlines()[-1]}")
    per_image = json.loads(stages.stdout)
    return [
        "",
        "| device cost (runtime-only install, onnxruntime, all threads) | value |",
        "|---|---|",
        f"| install size | {size_mib(scratch / 'runtime'):.0f} MiB, of which tokenizers "
        f"{size_mib(site / 'tokenizers'):.1f} MiB |",
        f"| cold start to the first PNG (`generate --n 1`, median of {runs}) | {statistics.median(cold):.2f} s |",
        *(f"| {stage}, per image at batch 8 | {seconds * 1000:.1f} ms |" for stage, seconds in per_image.items()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a few prompts and steps: checks the script runs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    count = 10 if args.smoke else args.n
    with_modelopt = not leave_out("modelopt (max)", args.smoke)  # a full run without modelopt stops here
    lines = [
        header(),
        f"{count} prompts, one seed each, guidance {args.guidance:g}; FP = the FP32 reference UNet through the same "
        "text encoder and VAE decoder. Export: its wall time, both samplers' correction terms included.",
        "",
        "| configuration | sampler | image PSNR to FP (dB) | FD to FP | digit accuracy | colour accuracy "
        "| export (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    fp: dict[str, tuple[str, torch.Tensor]] = {}  # sampler -> (reference graph sha256, FP images)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        calibration = scratch / "calibration.txt"
        calibration.write_text("\n".join(prompt(*a) for a in coloured_digit_prompts(50, offset=1000)) + "\n")
        for name, (options, calibrated_at) in CONFIGS.items():
            start = time.perf_counter()
            out = scratch / name.replace(" ", "-").replace(",", "")
            bundle = load_bundle(export(out, options, calibrated_at or args.guidance, calibration, args.smoke))
            seconds = time.perf_counter() - start
            score_samplers(lines, name, bundle, count, args.guidance, fp, f"{seconds:.0f}")
        for bits in MODELOPT if with_modelopt else ():
            denoiser, seconds = modelopt_denoiser(bits, args.guidance, calibration, args.smoke)
            name, bundle = f"modelopt max {bits} (torch fake-quant)", load_bundle(scratch / "W4A8-minmax")
            score_samplers(lines, name, bundle, count, args.guidance, fp, f"{seconds:.0f} (calibration)", denoiser)
        lines += device_cost(scratch / "W8A8-minmax", 1 if args.smoke else args.runs, scratch)
    publish("text-to-image", lines, not args.no_write and not args.smoke)


if __name__ == "__main__":
    main()
