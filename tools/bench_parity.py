"""Parity: what the layer-wise gate measures on every model the project has, what seeded faults give, and
what the check costs against the end-to-end comparison it replaced.

1. Thresholds: each model and configuration exported with default options (require_parity off, so every
   figure is recorded): codes compared, the worst quantizer's share of codes one step off and its headroom
   to the policy's allowance, codes two or more steps off, the end-to-end error, and what the former
   end-to-end gate (1e-3 INT8, 3e-3 CPU graph, 1e-2 FP8, 0.2 FP16) would have said.
2. Faults: on the demo model, each seeded fault of stepquant.export.faults for every target, format and
   precision: which check fires, and what the codes alone show.
3. Engines: the device-side check (`stepquant parity --backend`) on the demo, the conditional demo and
   demo-digits-sd, each exported with default options: for onnxruntime (at the bundle's level) and OpenVINO,
   each seeded fault standing in for a faulty engine (the engine runs the faulted graph, the reference is the
   bundle's own): caught segment by segment or not, and what the end-to-end replay statistic shows.
4. Cost: time and peak memory of the layer-wise check (plus the torch reference run the bundle keeps)
   against the end-to-end check, on the demo and the cifar10-architecture UNet, each in a fresh process.

    python tools/bench_parity.py [--only thresholds,faults,engines,cost] [--first N] [--no-write] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from benchdoc import header, parse_options, write_section
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from polygraphy.json import load_json

from stepquant.bundle import Bundle, load_bundle
from stepquant.calibrators import collect_calibration_set
from stepquant.calibrators.ranges import calibrate_ranges
from stepquant.calibrators.reconstruction import ReconstructionConfig
from stepquant.data.coloured_digits import colour_pairs, prompt
from stepquant.eval.memory import current_rss_mib, peak_rss_mib, reset_peak_rss
from stepquant.export.config import CalibrationConfig, ChecksConfig, ConditioningConfig
from stepquant.export.faults import FAULTS, seed_fault
from stepquant.export.layerwise import check_layerwise
from stepquant.export.onnx_export import OUTPUT_NAME, quantizer_map
from stepquant.export.parity import check_parity, parity_feeds, torch_outputs
from stepquant.export.parity_policy import parity_policy
from stepquant.export.precision import export_at_precision
from stepquant.export.segments import bundle_engine_policy, bundle_segment_runner, check_segments
from stepquant.export.shapes import DimRange, ShapeProfile
from stepquant.export.targets import for_target
from stepquant.models import DEMO_MODEL_NAME, EpsilonModel, load_model
from stepquant.models.demo_config import SCHEDULER_CONFIG
from stepquant.models.denoisers import sample_shape
from stepquant.models.reference_configs import DDPM_CIFAR10_UNET
from stepquant.models.tiny import TINY_MODELS, random_conditioning, save_tiny_pipeline
from stepquant.models.torch_backend import TorchBackend
from stepquant.pipeline import ExportConfig, export_quantized
from stepquant.quant import QuantSpec, quantize_
from stepquant.quant.quantize import round_scales_
from stepquant.runtime import SamplerConfig

FORMER_TOLERANCE = {
    "int8": 1e-3,
    "cpu": 3e-3,
    "fp8": 1e-2,
    "fp16": 0.2,
}  # the end-to-end gate the layer-wise one replaced
GUIDED = SamplerConfig(steps=10, guidance_scale=3.0)
CONDITIONAL_SHAPES = ShapeProfile(
    batch=DimRange(1, 4, 8), height=DimRange(8, 8, 16), width=DimRange(8, 8, 12), sequence=DimRange(4, 6, 8)
)
# a layout, schedule and data the suite never sees: RGB photo patches, cosine schedule, attention first
PHOTO_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=16,
)
PHOTO_SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True
)
# a conditional UNet from a config with other channel counts, text width and head size than the suite's
OTHER_CONDITIONAL = dict(block_out_channels=(24, 48), cross_attention_dim=20, attention_head_dim=4, norm_num_groups=4)


def photo_patch_model(root: Path, steps: int = 400) -> Path:
    """A small DDPM trained briefly on 16x16 patches of scikit-learn's two sample photographs."""
    from sklearn.datasets import load_sample_images

    photos = torch.cat(
        [
            torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            for image in load_sample_images().images
        ]
    )
    torch.manual_seed(0)
    unet, scheduler = UNet2DModel(**PHOTO_UNET), DDPMScheduler(**PHOTO_SCHEDULE)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    for _ in range(steps):
        image = torch.randint(len(photos), (32,))
        top, left = torch.randint(photos.shape[2] - 16, (32,)), torch.randint(photos.shape[3] - 16, (32,))
        clean = torch.stack([photos[i, :, y : y + 16, x : x + 16] for i, y, x in zip(image, top, left)])
        noise, t = torch.randn_like(clean), torch.randint(1000, (32,))
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(clean, noise, t), t).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(root / "photo-ddpm")
    return root / "photo-ddpm"


def cifar10_model(root: Path) -> Path:
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**DDPM_CIFAR10_UNET), scheduler=DDPMScheduler(**SCHEDULER_CONFIG)).save_pretrained(
        root / "cifar10"
    )
    return root / "cifar10"


def conditional_model(root: Path, kind: str, **overrides) -> dict:
    name = kind + ("-other" if overrides else "")
    pipeline = save_tiny_pipeline(kind, root / name, **overrides)
    conditioning = root / f"{name}.safetensors"
    random_conditioning(EpsilonModel(load_model(str(pipeline)).denoiser)).save(conditioning)
    return dict(
        model=str(pipeline),
        conditioning=ConditioningConfig(file=conditioning),
        sampler=GUIDED,
        shapes=CONDITIONAL_SHAPES,
    )


def configurations(root: Path) -> Iterator[tuple[str, dict]]:
    """(label, ExportConfig keywords): every model and configuration the project has, at default options
    except for fewer calibration and evaluation samples; each model is built when its turn comes."""

    def calibrated(samples: int = 16, **options) -> dict:
        return {"calibration": CalibrationConfig(samples=samples, **options)}

    demo = calibrated()
    yield from [
        ("demo W8A8", demo),
        ("demo W8A8, 8 calibration samples, 5 steps", dict(calibrated(8), sampler=SamplerConfig(steps=5))),
        ("demo W8A8, percentile 99.99", calibrated(calibrator="percentile")),
        ("demo W8A8, mse", calibrated(calibrator="mse")),
        ("demo W4A8", dict(demo, quant=QuantSpec(weight_bits=4))),
        ("demo W4A4", dict(demo, quant=QuantSpec(weight_bits=4, act_bits=4))),
        ("demo FP8", dict(demo, quant=QuantSpec(format="fp8"))),
        ("demo FP8, attention matmuls", dict(demo, quant=QuantSpec(format="fp8", fp8_attention=True))),
        ("demo W8A8, FP16 precision", dict(demo, precision="fp16")),
        ("demo W8A8, both targets", dict(demo, targets=("tensorrt", "onnxruntime-cpu"))),
        ("demo W8A8, 3 timestep groups", calibrated(timestep_groups=3)),
        (
            "demo W4A8, reconstruct (split skip, 50 iterations)",
            dict(
                calibrated(calibrator="reconstruct", reconstruction=ReconstructionConfig(iters=50)),
                quant=QuantSpec(weight_bits=4, split_skip_concat=True),
            ),
        ),
    ]
    yield "photo patches DDPM (cosine schedule)", dict(model=str(photo_patch_model(root)), **calibrated())
    cifar10 = dict(model=str(cifar10_model(root)), **calibrated(2), sampler=SamplerConfig(steps=4))
    yield "cifar10 architecture (random), both targets", dict(cifar10, targets=("tensorrt", "onnxruntime-cpu"))
    yield from (
        (f"tiny {kind} (random), guidance 3", dict(conditional_model(root, kind), **calibrated(4)))
        for kind in TINY_MODELS
    )
    yield "tiny sd (random), FP16 precision", dict(conditional_model(root, "sd"), **calibrated(4), precision="fp16")
    yield "tiny sd (random), FP8", dict(conditional_model(root, "sd"), **calibrated(4), quant=QuantSpec(format="fp8"))
    yield (
        "tiny conditional UNet, other config",
        dict(conditional_model(root, "sd", **OTHER_CONDITIONAL), **calibrated(4)),
    )


def threshold_rows(root: Path, first: int | None) -> tuple[list[str], dict]:
    rows = [
        "| model, configuration | target | quantizers (act + weight) | codes | one step off | worst quantizer's "
        "one-step "
        "share (headroom) | two or more steps off | end-to-end worst median | former gate | layer-wise gate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = {"one_step_headroom": float("inf"), "fp16_headroom": float("inf"), "multi_step": 0}
    for label, options in itertools.islice(configurations(root), first):
        start = time.perf_counter()
        report = export_quantized(
            ExportConfig(
                out=root / "bundle",
                overwrite=True,
                progress=False,
                **options,
                checks=ChecksConfig(eval_samples=8, require_parity=False),
            )
        )
        for target, result in report.targets.items():
            quant = options.get("quant", QuantSpec())
            kind = (
                "fp16"
                if options.get("precision") == "fp16"
                else quant.format
                if quant.format == "fp8"
                else "cpu"
                if target == "onnxruntime-cpu"
                else "int8"
            )
            quantizers = [q for layerwise in result.layerwise for q in layerwise.quantizers]
            activations = [q for q in quantizers if q.kind == "activation"]
            policy = result.layerwise[0].policy
            headroom = min(policy.allowed_one_step(q.codes) / max(q.one_step, 1) for q in activations)
            share = max(activations, key=lambda q: q.one_step_share)
            worst["fp16_headroom" if kind == "fp16" else "one_step_headroom"] = min(
                worst["fp16_headroom" if kind == "fp16" else "one_step_headroom"], headroom
            )
            worst["multi_step"] += sum(q.multi_step for q in activations)
            e2e = result.end_to_end.worst_median_reldiff
            rows.append(
                f"| {label} | {target} | {len(activations)} + {len(quantizers) - len(activations)} | "
                f"{sum(q.codes for q in activations):,} | {sum(q.one_step for q in activations)} | "
                f"{share.one_step_share:.3%} ({headroom:.0f}x) | {sum(q.multi_step for q in activations)} | {e2e:.1e} "
                "| "
                f"{'pass' if e2e <= FORMER_TOLERANCE[kind] else '**refused**'} | "
                f"{'pass' if result.parity_passed else '**FAIL**'} |"
            )
            print(rows[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    return rows, worst


def demo_graph(root: Path, target: str, format: str, precision: str):
    """The demo model calibrated (minmax, 8 trajectories of 25 steps) for `target`, exported; with feeds at 5
    timesteps."""
    loaded = load_model(DEMO_MODEL_NAME)
    shape = sample_shape(loaded.denoiser)
    fp_model = EpsilonModel(loaded.denoiser)
    calib = collect_calibration_set(
        TorchBackend(fp_model),
        loaded.scheduler_config,
        range(1_000_000, 1_000_008),
        shape,
        SamplerConfig(),
        25,
        progress=False,
    )
    model = EpsilonModel(copy.deepcopy(loaded.denoiser))
    spec = QuantSpec(format=format)
    quantize_(model, spec)
    calibrate_ranges(model, calib, progress=False)
    model = for_target(model, target)
    calibrate_ranges(model, calib, progress=False, only_uncalibrated=True)
    if precision == "fp16":
        round_scales_(model, torch.float16)
    path = root / f"{target}-{format}-{precision}.onnx"
    export_at_precision(model, path, shape, precision, spec.opset)
    picks = calib.unique_timesteps()[::6]
    parts = [calib.at_timestep(t, 4) for t in picks]
    feeds = parity_feeds(torch.cat([p.samples for p in parts]), torch.cat([p.timesteps for p in parts]))
    return model, path, feeds


def fault_rows(root: Path, first: int | None) -> list[str]:
    rows = [
        "| target, format, precision | fault (at quantizer) | gate | static check | quantizers failing on codes | "
        "worst one-step share (allowed) | codes two or more steps off |",
        "|---|---|---|---|---|---|---|",
    ]
    kinds = [
        ("tensorrt", "int8", "fp32"),
        ("onnxruntime-cpu", "int8", "fp32"),
        ("tensorrt", "fp8", "fp32"),
        ("tensorrt", "int8", "fp16"),
    ]
    for kind in kinds[:first]:
        model, path, feeds = demo_graph(root, *kind)
        policy = parity_policy(*kind)
        clean, _ = check_layerwise(model, path, feeds, policy)
        rows.append(
            f"| {', '.join(kind)} | none | {'pass' if clean.passed else '**FAIL**'} | - | 0 | "
            f"{max(q.one_step_share for q in clean.quantizers):.3%} ({policy.max_one_step_share:.1%}) | "
            f"{sum(q.multi_step for q in clean.quantizers)} |"
        )
        for fault in FAULTS:
            quantizer = seed_fault(path, root / "faulty.onnx", fault)
            report, _ = check_layerwise(model, root / "faulty.onnx", feeds, policy)
            static = [q.name for q in report.quantizers if q.mismatches]
            by_codes = [q for q, found in report.failures if any("codes" in f for f in found)]
            rows.append(
                f"| {', '.join(kind)} | {fault} ({quantizer.removeprefix('unet.')}) | "
                f"{'pass' if report.passed else 'fails'} | {'mismatch' if static else 'equal'} | {len(by_codes)} | "
                f"{max((q.one_step_share for q in report.quantizers), default=0):.2%} "
                f"({policy.max_one_step_share:.1%}) | "
                f"{sum(q.multi_step for q in report.quantizers)} |"
            )
            print(rows[-1], flush=True)
    return rows


def engine_bundles(root: Path, smoke: bool) -> Iterator[tuple[str, Path]]:
    """(label, bundle) of each demo exported by the CLI with default options (fewer evaluation samples)."""
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(prompt(i % 10, *colour_pairs()[i], i) for i in range(16)) + "\n")
    models = [
        ("demo-digits", "demo-digits", []),
        ("demo-digits-cond", "demo-digits-cond", []),
        ("demo-digits-sd", "demo-digits-sd", ["--prompts-file", str(prompts)]),
        ("demo-digits FP8", "demo-digits", ["--format", "fp8"]),
        ("demo-digits FP16", "demo-digits", ["--precision", "fp16"]),
    ]
    for label, name, options in models[:1] if smoke else models:
        out = root / label.replace(" ", "-")
        subprocess.run(
            [Path(sys.executable).parent / "export-quantized", "--model", name, *options, "--out", out, "--overwrite"]
            + ["--no-progress", "--eval-samples", "8"],
            check=True,
            capture_output=True,
        )
        yield label, out


def _replay_error(bundle: Bundle, graph: Path, backend: str) -> str:
    """The end-to-end replay's statistic for `graph` run by `backend`, against the replay's tolerance: the worst
    median relative error of eps over the bundle's saved inputs, against its saved fake-quant torch outputs."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    from stepquant.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from stepquant.runtime.openvino_backend import OpenVINOBackend

    section = bundle.target(bundle.target_for(backend))
    parity = section.timestep_groups[0].parity
    feeds = load_json(bundle.file(f"{parity}/inputs.json"))
    reference = RunResults.load(str(bundle.file(f"{parity}/reference_outputs.json")))[0][1]
    if backend == "openvino":
        run = OpenVINOBackend(graph, threads=2).run
    else:
        run = OnnxRuntimeBackend(graph, optimization_level=section.onnxruntime_optimization_level).run
    worst = 0.0
    for feed, expected in zip(feeds, reference):
        want = np.asarray(expected[OUTPUT_NAME])
        try:
            got = run(dict(feed))[0]
        except RuntimeError as err:  # OpenVINO cannot run an FP8 dequantizer given an INT8 zero point
            return f"not run: {str(err).strip().splitlines()[-1][:60]}"
        worst = max(worst, float(np.median(np.abs(got - want) / np.maximum(np.abs(want), 1e-30))))
    return f"{worst:.1e} ({section.replay_tolerance:.2g})"


def _last_weight_quantizer(graph: Path) -> str:
    """The weight quantizer of the graph's last quantized layer: a fault there reaches the output unrequantized."""
    model = onnx.load(str(graph))
    names = quantizer_map(model)
    return [names[n.name] for n in model.graph.node if names.get(n.name, "").endswith("weight_quantizer")][-1]


def engine_rows(root: Path, smoke: bool) -> list[str]:
    rows = [
        "| model | backend | fault (at quantizer) | segments | first failing segment (or the worst) | "
        "end-to-end worst median (replay tolerance) |",
        "|---|---|---|---|---|---|",
    ]
    faults = [(fault, None) for fault in FAULTS] + [("weight scale 2% off", "last")]
    for label, out in engine_bundles(root, smoke):
        bundle = load_bundle(out)
        for backend in ("onnxruntime", "openvino"):
            section = bundle.target(bundle.target_for(backend))
            graph = bundle.file(section.graphs[0])
            feeds = load_json(bundle.file(f"{section.timestep_groups[0].parity}/inputs.json"))
            policy = bundle_engine_policy(bundle, backend)
            runner = bundle_segment_runner(backend, section.onnxruntime_optimization_level, threads=2)
            for fault, where in [("none", None), *faults[: 2 if smoke else None]]:
                engine, quantizer = graph, "-"
                if fault != "none":
                    engine = root / "faulty.onnx"
                    where = _last_weight_quantizer(graph) if where == "last" else None
                    quantizer = seed_fault(graph, engine, fault, where).removeprefix("unet.")
                report = check_segments(engine, feeds, runner, policy, reference_graph=graph)
                first = report.failures[0] if report.failures else None
                verdict = {(True, True): "**refused**", (True, False): "caught", (False, True): "pass"}
                rows.append(
                    f"| {label} | {backend} | {fault} ({quantizer}) | "
                    f"{verdict.get((bool(first), fault == 'none'), '**missed**')} | "
                    f"{f'{first[0].name}: {first[1][0]}' if first else report.summary()} | "
                    f"{_replay_error(bundle, engine, backend)} |"
                )
                print(rows[-1], flush=True)
    return rows


def _cost_child(model_name: str, check: str) -> None:
    """In this fresh process: calibrate and export `model_name`, then time one check and report its peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        if model_name == "demo":
            model, path, feeds = demo_graph(Path(tmp), "tensorrt", "int8", "fp32")
        else:
            unet = UNet2DModel(**DDPM_CIFAR10_UNET).eval()
            model = EpsilonModel(copy.deepcopy(unet))
            quantize_(model, QuantSpec())
            data = collect_calibration_set(
                TorchBackend(EpsilonModel(unet)),
                SCHEDULER_CONFIG,
                range(4),
                (3, 32, 32),
                SamplerConfig(steps=5),
                5,
                progress=False,
            )
            calibrate_ranges(model, data, progress=False)
            path = Path(tmp) / "cifar10.onnx"
            export_at_precision(model, path, (3, 32, 32), "fp32", 17)
            parts = [data.at_timestep(t, 4) for t in data.unique_timesteps()]
            feeds = parity_feeds(torch.cat([p.samples for p in parts]), torch.cat([p.timesteps for p in parts]))
        before = current_rss_mib()
        if not reset_peak_rss():
            raise SystemExit("measuring one stage's peak memory needs Linux's /proc/self/clear_refs")
        start = time.perf_counter()
        if check == "layerwise":
            check_layerwise(model, path, feeds, parity_policy("tensorrt", "int8", "fp32"))
            torch_outputs(model, feeds)  # the reference the bundle saves for replays
        else:
            check_parity(model, path, feeds, optimization_level="disable")
        seconds = time.perf_counter() - start
        peak = peak_rss_mib()
        print(
            json.dumps(
                {
                    "seconds": seconds,
                    "peak_mib": peak,
                    "added_mib": max(peak - before, 0.0),
                    "feeds": len(feeds),
                    "batch": int(feeds[0]["sample"].shape[0]),
                }
            )
        )


def cost_rows(first: int | None) -> list[str]:
    rows = [
        "| model | inputs (batch) | end-to-end check: s / peak MiB (added) | layer-wise check + reference: s / peak "
        "MiB (added) |",
        "|---|---|---|---|",
    ]
    for model_name in ("demo", "cifar10")[:first]:
        runs = {}
        for check in ("end-to-end", "layerwise"):
            output = subprocess.run(
                [sys.executable, __file__, "--cost-child", model_name, check],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[check] = json.loads(output.strip().splitlines()[-1])
        cells = [f"{r['seconds']:.2f} / {r['peak_mib']:.0f} (+{r['added_mib']:.0f})" for r in runs.values()]
        rows.append(
            f"| {model_name} | {runs['layerwise']['feeds']} ({runs['layerwise']['batch']}) | {' | '.join(cells)} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="thresholds,faults,cost")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--first", type=int, help="only the first N configurations, fault kinds and cost models")
    parser.add_argument("--cost-child", nargs=2, help=argparse.SUPPRESS)
    args = parse_options(parser, only="thresholds,faults,engines", first=1)
    if args.cost_child:
        return _cost_child(*args.cost_child)
    with tempfile.TemporaryDirectory() as tmp:
        if "thresholds" in args.only:
            rows, worst = threshold_rows(Path(tmp), args.first)
            body = (
                header() + "\nEvery model and configuration at default options (fewer calibration and 8 evaluation "
                "samples), each graph checked on its export's parity inputs (5 calibration timesteps x batch 4, plus "
                "the "
                "range corners for dynamic shapes). Headroom: the policy's allowance over the quantizer's count, for "
                "the quantizer nearest to it.\n\n"
                + "\n".join(rows)
                + f"\n\nLeast headroom on one-step codes: {worst['one_step_headroom']:.0f}x (FP32 graphs), "
                f"{worst['fp16_headroom']:.1f}x (FP16 graphs); codes two or more steps off, all graphs: "
                f"{worst['multi_step']}.\n"
            )
            _write("bench_parity_thresholds", body, args.no_write)
        if "faults" in args.only:
            body = (
                header() + "\nSeeded faults on the demo model (minmax on 8 trajectories, 20 inputs at 5 timesteps), "
                "one quantizer each (the middle convolution input or weight).\n\n"
                + "\n".join(fault_rows(Path(tmp), args.first))
                + "\n"
            )
            _write("bench_parity_faults", body, args.no_write)
        if "engines" in args.only:
            body = (
                header() + "\nEach demo exported with default options; the engine runs the faulted graph, segment "
                "by segment fed the codes of onnxruntime running the bundle's own graph as written; the last column is "
                "the end-to-end replay's statistic for the same engine, against the bundle's saved fake-quant "
                "outputs.\n\n" + "\n".join(engine_rows(Path(tmp), args.smoke)) + "\n"
            )
            _write("bench_parity_engines", body, args.no_write)
    if "cost" in args.only:
        body = (
            header() + "\nEach in a fresh process after calibration and export; peak: the process's peak resident "
            "memory during the check (VmHWM reset before it), added: that peak over its memory before the check.\n\n"
            + "\n".join(cost_rows(args.first))
            + "\n"
        )
        _write("bench_parity_cost", body, args.no_write)


def _write(section: str, body: str, dry_run: bool) -> None:
    if not dry_run:
        write_section(section, body)


if __name__ == "__main__":
    main()
