"""Real-size models, measured as far as the machine allows:

- sd15: an SD-1.5-architecture `UNet2DConditionModel` (its published config, random weights: 860M parameters)
  with conditioning from a file, exported at W8A8 by the `export-quantized` command in a child process, once per
  `--calib-samples` value: wall time, peak RSS (the child's, from wait4), graph sizes. With CUDA, also on
  `--device cuda` (peak GPU memory read from the bundle's manifest).
- reconstruct-memory: the demo's W4A8 export with each learning calibrator (`--recon-calibrators`) at each
  `--recon-calib-samples` value: peak RSS (reconstruction keeps each block's inputs and targets in files beside
  the calibration set; multistep and mixed-order read its sampler states a batch at a time).
- demo-device: the demo's W4A8 `reconstruct` export per device (`--devices`; CUDA where present): wall time,
  calibration time, PSNR to FP, peak GPU memory.
- torchrun: the demo exported by one process and by two under torchrun (gloo, every process one thread, as
  torchrun starts them): minmax scales compared bit for bit; `reconstruct` at W4A8 compared by PSNR to FP, against
  the PSNR noise of one process with another reconstruction seed; the time of each run.
- sdxl: SDXL's architecture built in memory (2.6B parameters): its size, the resident memory it takes and one
  FP forward pass; what the export needs is estimated from sd15's measured ratio (written beside, as an estimate).

    python tools/bench_scale.py                                     (all three: about an hour on 2 cores)
    python tools/bench_scale.py --parts sd15 --calib-samples 2,8
    python tools/bench_scale.py --parts demo-device,sd15 --devices cuda,cpu --calib-samples 2   (on a GPU machine)
    python tools/bench_scale.py --smoke                             (a quick check that it runs; writes nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchdoc import header, parse_options, publish
from diffusers import DDIMScheduler, UNet2DConditionModel

from stepquant.runtime.guidance import Conditioning

BIN = Path(sys.executable).parent
GIB = 2**30
TOKENS, SD15_WIDTH = 77, 768
SD_SCHEDULER = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
# diffusers' UNet2DConditionModel defaults are SD 1.x's UNet but for the text width
SD15 = dict(cross_attention_dim=SD15_WIDTH)
SDXL = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def run_measured(command: list, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `command`; return it, its wall time (s) and its peak RSS (GiB; for torchrun, of its largest process)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([str(c) for c in command], stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(command, os.waitstatus_to_exitcode(status), out.read(), err.read())
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result, seconds, usage.ru_maxrss * 1024 / GIB


def save_sd15(root: Path, latent: int) -> tuple[Path, Path, int]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=latent, **SD15)
    parameters = sum(p.numel() for p in unet.parameters())
    unet.save_pretrained(root / "unet")
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "scheduler": ["diffusers", "DDIMScheduler"],
            }
        )
    )
    generator = torch.Generator().manual_seed(0)
    conditioning = root.parent / "sd15-conditioning.safetensors"
    Conditioning(
        {"encoder_hidden_states": torch.randn(4, TOKENS, SD15_WIDTH, generator=generator)},
        {"encoder_hidden_states": torch.randn(1, TOKENS, SD15_WIDTH, generator=generator)},
    ).save(conditioning)
    return root, conditioning, parameters


def graph_gib(bundle: Path, graph: str) -> str:
    data = bundle / f"{graph}.data"
    size = (bundle / graph).stat().st_size + (data.stat().st_size if data.exists() else 0)
    return f"{size / GIB:.2f}" + (" (external data)" if data.exists() else "")


def devices(args) -> list[str]:
    """--devices, without CUDA where torch sees none."""
    return [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]


def gpu_memory(calibration: dict) -> str:
    gpu = calibration.get("peak_gpu_memory_gib")
    return "-" if gpu is None else f"{gpu:.2f} GiB"


def quality_psnr(stdout: str) -> float:
    """The PSNR to FP that export-quantized prints on its quality line."""
    return float(next(line for line in stdout.splitlines() if "quality:" in line).split("PSNR to FP ")[1].split()[0])


def sd15_rows(workdir: Path, args) -> tuple[list[str], float | None]:
    if not devices(args):
        return [f"No device of --devices {args.devices} here."], None
    model, conditioning, parameters = save_sd15(workdir / "sd15", args.latent)
    rows = [
        f"SD-1.5 architecture: {parameters / 1e6:.0f}M parameters, {args.latent}x{args.latent} latents, "
        f"{TOKENS} tokens, guidance 7.5, {args.steps} DDIM steps, W8A8 minmax, every other option at its default.",
        "",
        "| device | --calib-samples | calibration inputs | wall (s) | peak RSS (GiB) | FP32 graph (GiB) | Q/DQ graph "
        "(GiB) | calibration (s) | peak GPU memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    peaks = {}
    for device in devices(args):
        for samples in map(int, args.calib_samples.split(",")):
            out = workdir / f"sd15-{device}-{samples}"
            _, seconds, peak = run_measured(
                [
                    BIN / "export-quantized",
                    "--model",
                    model,
                    "--conditioning",
                    conditioning,
                    "--out",
                    out,
                    "--calib-samples",
                    samples,
                    "--steps",
                    args.steps,
                    "--guidance-scale",
                    7.5,
                    "--eval-samples",
                    2,
                    "--device",
                    device,
                    "--dtype",
                    args.dtype,
                    "--no-progress",
                ]
            )
            calibration = json.loads((out / "manifest.json").read_text())["calibration"]
            rows.append(
                f"| {device} ({calibration['fp_dtype']} reference) | {samples} | {calibration['inputs']} | "
                f"{seconds:.0f} | {peak:.2f} | "
                f"{graph_gib(out, 'model_fp32.onnx')} | {graph_gib(out, 'model.onnx')} | {calibration['seconds']:.0f} "
                "| "
                f"{gpu_memory(calibration)} |"
            )
            print(rows[-1], flush=True)
            peaks[(device, samples)] = peak
            shutil.rmtree(out)
    counts = sorted({s for d, s in peaks if d == "cpu"})
    if len(counts) < 2:
        return rows, None
    growth = peaks[("cpu", counts[-1])] / peaks[("cpu", counts[0])] - 1
    rows += [
        "",
        f"Peak RSS from --calib-samples {counts[0]} to {counts[-1]} on the CPU: {100 * growth:+.1f}% (target: at most "
        "+10%).",
    ]
    return rows, peaks[("cpu", counts[0])] / (4 * parameters / GIB)


def reconstruct_memory_rows(workdir: Path, args) -> list[str]:
    rows = [
        f"demo-digits, W4A8 ({args.recon_iters} reconstruction iterations per block), 25 DDIM steps, --device cpu, "
        "--eval-samples 8.",
        "",
        "| calibrator | --calib-samples | calibration inputs | wall (s) | peak RSS (GiB) |",
        "|---|---|---|---|---|",
    ]
    for calibrator in args.recon_calibrators.split(","):
        peaks = []
        for samples in map(int, args.recon_calib_samples.split(",")):
            out = workdir / f"{calibrator}-{samples}"
            _, seconds, peak = run_measured(
                [
                    BIN / "export-quantized",
                    "--out",
                    out,
                    "--steps",
                    25,
                    "--calibrator",
                    calibrator,
                    "--weight-bits",
                    4,
                    "--recon-iters",
                    args.recon_iters,
                    "--calib-samples",
                    samples,
                    "--eval-samples",
                    8,
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
            calibration = json.loads((out / "manifest.json").read_text())["calibration"]
            rows.append(f"| {calibrator} | {samples} | {calibration['inputs']} | {seconds:.0f} | {peak:.3f} |")
            print(rows[-1], flush=True)
            peaks.append(peak)
            shutil.rmtree(out)
        rows.append(
            f"| {calibrator} | peak RSS from the fewest to the most samples | | | "
            f"{100 * (peaks[-1] / peaks[0] - 1):+.1f}% |"
        )
    return rows


def demo_device_rows(workdir: Path, args) -> list[str]:
    if not devices(args):
        return [f"No device of --devices {args.devices} here."]
    rows = [
        f"demo-digits, W4A8 reconstruct ({args.recon_iters} iterations per block), 25 DDIM steps, "
        f"{args.demo_calib_samples} calibration trajectories, PSNR over {args.demo_eval_samples} seeds; "
        f"torch's CPU threads: {torch.get_num_threads()}.",
        "",
        "| device | wall (s) | calibration (s) | PSNR to FP (dB) | peak GPU memory |",
        "|---|---|---|---|---|",
    ]
    for device in devices(args):
        out = workdir / f"demo-{device}"
        result, seconds, _ = run_measured(
            [
                BIN / "export-quantized",
                "--out",
                out,
                "--steps",
                25,
                "--calibrator",
                "reconstruct",
                "--weight-bits",
                4,
                "--recon-iters",
                args.recon_iters,
                "--calib-samples",
                args.demo_calib_samples,
                "--eval-samples",
                args.demo_eval_samples,
                "--device",
                device,
                "--no-progress",
            ]
        )
        calibration = json.loads((out / "manifest.json").read_text())["calibration"]
        rows.append(
            f"| {device} ({calibration['device_name']}) | {seconds:.0f} | {calibration['seconds']:.0f} | "
            f"{quality_psnr(result.stdout):.2f} | {gpu_memory(calibration)} |"
        )
        print(rows[-1], flush=True)
    return rows


def scales(graph: Path) -> dict[str, bytes]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    constants = {init.name: numpy_helper.to_array(init).tobytes() for init in model.graph.initializer}
    return {node.name: constants[node.input[1]] for node in model.graph.node if node.op_type == "QuantizeLinear"}


def torchrun_rows(workdir: Path, args) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    common = [
        "--steps",
        25,
        "--calib-samples",
        args.demo_calib_samples,
        "--eval-samples",
        args.demo_eval_samples,
        "--device",
        "cpu",
        "--no-progress",
    ]
    runs = {
        "minmax W8A8": [],
        "reconstruct W4A8": ["--calibrator", "reconstruct", "--weight-bits", 4, "--recon-iters", args.recon_iters],
    }
    rows = [
        f"demo-digits, 25 DDIM steps, {args.demo_calib_samples} calibration trajectories in batches of 8, "
        f"PSNR over {args.demo_eval_samples} seeds; every process runs one thread (torchrun's OMP_NUM_THREADS=1).",
        "",
        "| calibrator | run | wall (s) | activation scales equal to one process's | PSNR to FP (dB) |",
        "|---|---|---|---|---|",
    ]
    for name, extra in runs.items():
        variants = {
            "one process": ([BIN / "export-quantized"], []),
            "two processes (torchrun)": (
                [BIN / "torchrun", "--standalone", "--nproc-per-node", 2, "--no-python", "export-quantized"],
                [],
            ),
        }
        if name.startswith("reconstruct"):  # the PSNR noise: the same run with another reconstruction seed
            variants["one process, seed 1"] = ([BIN / "export-quantized"], ["--seed", 1])
        reference = None
        for label, (launcher, more) in variants.items():
            out = workdir / f"{name.split()[0]}-{len(variants)}-{label.split()[0]}-{len(more)}"
            result, seconds, _ = run_measured([*launcher, "--out", out, *common, *extra, *more], env)
            psnr = quality_psnr(result.stdout)
            found = scales(out / "model.onnx")
            reference = reference or found
            equal = sum(found[k] == reference.get(k) for k in found)
            rows.append(f"| {name} | {label} | {seconds:.0f} | {equal}/{len(found)} | {psnr:.2f} |")
            print(rows[-1], flush=True)
    rows += [
        "",
        "'seed 1' moves the evaluation and calibration seeds too: it measures how far two equally good "
        "runs of one process land apart, the noise a two-process run is judged against.",
    ]
    return rows


def sdxl_rows(sd15_ratio: float | None, latent: int) -> list[str]:
    torch.manual_seed(0)
    start = time.perf_counter()
    unet = UNet2DConditionModel(sample_size=latent, **SDXL).eval()
    built = time.perf_counter() - start
    parameters = sum(p.numel() for p in unet.parameters())
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
    x = torch.randn(2, 4, latent, latent)
    added = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)}
    with torch.inference_mode():
        start = time.perf_counter()
        unet(
            x, torch.tensor([500.0, 500.0]), encoder_hidden_states=torch.randn(2, TOKENS, 2048), added_cond_kwargs=added
        )
        forward = time.perf_counter() - start
    fp32 = 4 * parameters / GIB
    rows = [
        f"SDXL architecture (published config, random weights): {parameters / 1e9:.2f}B parameters, FP32 weights "
        f"{fp32:.1f} GiB (over protobuf's 2 GiB: external data), INT8 weights {parameters / GIB:.1f} GiB (over it "
        "too).",
        "",
        "| measured here | value |",
        "|---|---|",
        f"| build in memory | {built:.0f} s |",
        f"| resident memory with the model built | {rss:.1f} GiB |",
        f"| one FP32 forward, batch 2 (one guided image), {latent}x{latent} latents | {forward:.1f} s |",
        "",
    ]
    if sd15_ratio is not None:
        rows += [
            f"Estimated, not measured: the SD-1.5 export peaked at {sd15_ratio:.1f}x its FP32 weights (FP model, "
            f"fake-quant copy, integer weights, the graphs being written); at that ratio SDXL's export needs about "
            f"{sd15_ratio * fp32:.0f} GiB, over this machine's 24 GiB; a 64 GiB host or a GPU host with CPU RAM to "
            "match "
            "would hold it. Time scales with the forward pass above times (calibration samples x steps x 2) plus "
            "the two graph exports."
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="sd15,torchrun,sdxl")
    parser.add_argument("--calib-samples", default="2,8", help="sd15: the --calib-samples values compared")
    parser.add_argument(
        "--devices", default="cpu,cuda", help="sd15 and demo-device: --device values (cuda where present)"
    )
    parser.add_argument("--dtype", default="float32", help="sd15: --dtype of the FP reference")
    parser.add_argument(
        "--recon-calib-samples", default="16,128", help="reconstruct-memory: the --calib-samples values"
    )
    parser.add_argument(
        "--recon-calibrators",
        default="reconstruct,mixed-order,multistep",
        help="reconstruct-memory: the calibrators measured",
    )
    parser.add_argument("--steps", type=int, default=2, help="sd15: sampler steps")
    parser.add_argument("--latent", type=int, default=32, help="latent size of sd15 and sdxl")
    parser.add_argument("--demo-calib-samples", type=int, default=32)
    parser.add_argument("--demo-eval-samples", type=int, default=128)
    parser.add_argument("--recon-iters", type=int, default=100)
    parser.add_argument("--no-write", action="store_true")
    args = parse_options(
        parser, parts="demo-device", devices="cpu", recon_iters=2, demo_calib_samples=4, demo_eval_samples=4
    )
    parts = args.parts.split(",")
    lines = [header()]
    ratio = None
    with tempfile.TemporaryDirectory() as tmp:
        if "reconstruct-memory" in parts:
            lines += [
                "### Learning calibrators' memory against the sample count",
                "",
                *reconstruct_memory_rows(Path(tmp), args),
                "",
            ]
        if "demo-device" in parts:
            lines += ["### The demo's reconstruct export per device", "", *demo_device_rows(Path(tmp), args), ""]
        if "sd15" in parts:
            rows, ratio = sd15_rows(Path(tmp), args)
            lines += ["### SD-1.5 architecture", "", *rows, ""]
        if "torchrun" in parts:
            lines += ["### Two processes under torchrun", "", *torchrun_rows(Path(tmp), args), ""]
    if "sdxl" in parts:
        lines += ["### SDXL architecture", "", *sdxl_rows(ratio, args.latent), ""]
    publish(f"bench_scale_{'_'.join(parts)}", lines, not args.no_write)


if __name__ == "__main__":
    main()
