"""Shared fixtures: a tiny random UNet (fast), one small bundle exported from the demo model, and tiny random
Stable Diffusion and SDXL pipelines with their whole-pipeline bundles."""

from __future__ import annotations

import importlib.util
import inspect
import os
import platform
import subprocess
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from stepquant.export.config import CalibrationConfig, ChecksConfig
from stepquant.models.demo_config import SCHEDULER_CONFIG
from stepquant.models.tiny import TINY_PROMPTS, save_tiny_text_pipeline
from stepquant.pipeline import ExportConfig, export_quantized
from stepquant.quant import QuantSpec
from stepquant.runtime import SamplerConfig

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 16,
}
FEW_STEPS = SamplerConfig(steps=4)
FAST = [
    "--steps",
    "4",
    "--calib-samples",
    "4",
    "--eval-samples",
    "4",
    "--no-progress",
]  # export options: seconds, not minutes


def run_cli(command: str, *args) -> subprocess.CompletedProcess:
    """`command ARGS` (stepquant or export-quantized) run in this process as its console script would run it,
    without a Python start-up per call; the signal tests start real processes."""
    from stepquant.cli.main import invoke

    code, out, err = invoke(command, [str(a) for a in args])
    return subprocess.CompletedProcess([command, *map(str, args)], code, out, err)


def selected_params(request: pytest.FixtureRequest, test: str, name: str) -> list:
    """The values of parameter `name` of `test` that this session runs (after -k, -m and deselection)."""
    return [
        item.callspec.params[name]
        for item in request.session.items
        if getattr(item, "originalname", None) == test and hasattr(item, "callspec")
    ]


def run_side_by_side(runs: dict[str, Callable[[], object]]) -> dict[str, Future]:
    """Start every run (a call that waits for a child process), as many at once as there are CPUs; each test then
    waits for its own. The examples and the tools' smoke runs spend much of their time starting Python and
    importing torch and diffusers, on one core, so two cores run two of them in little more than the time of one."""
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    futures = {key: pool.submit(run) for key, run in runs.items()}
    pool.shutdown(wait=False)
    return futures


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    """A failure as every command must end: non-zero exit, one line naming the problem, no traceback."""
    assert result.returncode != 0, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "error:" in lines[0] and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


# the CPU engines a device-side check (`stepquant parity --backend`) runs on here
ENGINE_BACKENDS = [
    "onnxruntime",
    pytest.param(
        "openvino", marks=pytest.mark.skipif(not importlib.util.find_spec("openvino"), reason="OpenVINO not installed")
    ),
]


def bundle_graph(bundle_path: Path, backend: str) -> Path:
    """The graph a device's `backend` runs from the bundle (its first timestep group's)."""
    from stepquant.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    return bundle.file(bundle.target(bundle.target_for(backend)).graphs[0])


def check_engine(bundle_path: Path, backend: str, engine_graph: Path | None = None):
    """The segment check of `bundle_graph` on `backend`, with `engine_graph` (default: that graph, unchanged)
    standing in for the engine; returns the SegmentReport."""
    from polygraphy.json import load_json

    from stepquant.bundle import load_bundle
    from stepquant.export.segments import bundle_engine_policy, bundle_segment_runner, check_segments

    bundle = load_bundle(bundle_path)
    section = bundle.target(bundle.target_for(backend))
    return check_segments(
        engine_graph or bundle_graph(bundle_path, backend),
        load_json(bundle.file(f"{section.timestep_groups[0].parity}/inputs.json")),
        bundle_segment_runner(backend, section.onnxruntime_optimization_level),
        bundle_engine_policy(bundle, backend),
        reference_graph=bundle_graph(bundle_path, backend),
    )


def _exact_integer_kernels() -> bool:
    """Whether onnxruntime's fused U8S8 kernels are exact here: on x86 they need VNNI (AVX-512 VNNI or
    AVX-VNNI), since without it they sum u8 x s8 pairs into saturating 16-bit integers (vpmaddubsw), so values
    differ from the simulation. Unknown flags (no /proc/cpuinfo) count as no VNNI."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


needs_exact_integer_kernels = pytest.mark.skipif(
    not _exact_integer_kernels(),
    reason="onnxruntime's U8S8 integer kernels saturate on x86 CPUs without VNNI (vpmaddubsw)",
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight UNet2DModel saved as a diffusers DDPMPipeline directory."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny"
    DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=DDPMScheduler(**SCHEDULER_CONFIG)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    """The demo model exported at W8A8 with few steps; returns (bundle path, ExportReport)."""
    out = tmp_path_factory.mktemp("bundles") / "demo-w8a8"
    report = export_quantized(
        ExportConfig(
            out=out,
            sampler=FEW_STEPS,
            progress=False,
            calibration=CalibrationConfig(samples=8),
            checks=ChecksConfig(eval_samples=8),
        )
    )
    return out, report


@pytest.fixture(scope="session")
def fp8_bundle(tmp_path_factory):
    """The demo model exported at FP8 (E4M3) with few steps; returns (bundle path, ExportReport)."""
    out = tmp_path_factory.mktemp("fp8") / "bundle"
    report = export_quantized(
        ExportConfig(
            out=out,
            quant=QuantSpec(format="fp8"),
            sampler=FEW_STEPS,
            progress=False,
            calibration=CalibrationConfig(samples=8),
            checks=ChecksConfig(eval_samples=8),
        )
    )
    return out, report


@pytest.fixture(scope="session")
def fp16_bundle(tmp_path_factory):
    """The demo model exported at W8A8 with FP16 precision; returns (bundle path, ExportReport)."""
    out = tmp_path_factory.mktemp("fp16") / "bundle"
    report = export_quantized(
        ExportConfig(
            out=out,
            precision="fp16",
            sampler=FEW_STEPS,
            progress=False,
            calibration=CalibrationConfig(samples=8),
            checks=ChecksConfig(eval_samples=8),
        )
    )
    return out, report


@pytest.fixture(scope="session")
def text_pipeline(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion pipeline directory (`sd/`) and a prompts file beside it."""
    root = tmp_path_factory.mktemp("text-to-image")
    save_tiny_text_pipeline(root / "sd")
    (root / "prompts.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    return root


@pytest.fixture(scope="session")
def text_bundle(text_pipeline) -> Path:
    """Its whole-pipeline bundle (guidance 3, 4 DDIM steps)."""
    result = run_cli(
        "export-quantized",
        "--model",
        text_pipeline / "sd",
        "--prompts-file",
        text_pipeline / "prompts.txt",
        "--out",
        text_pipeline / "bundle",
        "--guidance-scale",
        "3",
        *FAST,
    )
    assert result.returncode == 0, result.stderr
    return text_pipeline / "bundle"


def _tiny_text_bundle(text_pipeline: Path, kind: str) -> Path:
    """KIND/pipe: a tiny random pipeline of that kind; KIND/bundle: its export from the prompts (guidance 3)."""
    root = text_pipeline / kind
    save_tiny_text_pipeline(root / "pipe", kind=kind)
    prompts = ["--prompts-file", text_pipeline / "prompts.txt", "--guidance-scale", "3"]
    result = run_cli("export-quantized", "--model", root / "pipe", *prompts, "--out", root / "bundle", *FAST)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="session")
def sdxl_pipeline(text_pipeline) -> Path:
    """A tiny random SDXL pipeline (`pipe/`) and its bundle (`bundle/`)."""
    return _tiny_text_bundle(text_pipeline, "sdxl")


@pytest.fixture(scope="session")
def pixart_pipeline(text_pipeline) -> Path:
    """A tiny random PixArt-Sigma pipeline (`pipe/`: T5 tokenizer and encoder, transformer, VAE) and its
    bundle (`bundle/`)."""
    return _tiny_text_bundle(text_pipeline, "pixart")


# The slow tier (`make test` runs it, `make test-fast` leaves it out): a test is slow when it exports a bundle, or
# uses a fixture that does. Everything else is the inner loop's.
EXPORTING_FIXTURES = frozenset(
    {
        "demo_bundle",
        "text_bundle",
        "sdxl_pipeline",
        "pixart_pipeline",
        "bundle_copy",
        "cli_bundle",
        "exported",
        "corrected_bundle",
        "cpu_graph",
        "calibrated",
        "external_bundle",
        "fp16_bundle",
        "fp8_bundle",
        "class_model",
        "guided_calibration",
        "graph",
        "conditional_bundle",
        "guided_sets",
        "bundle",
        "demo_backends",
    }
)
EXPORT_CALLS = ("export_quantized(", '"export-quantized"', "export_graphs(", "calibrate_model(", "tools/")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function is not None else ""
        if EXPORTING_FIXTURES & set(getattr(item, "fixturenames", ())) or any(call in source for call in EXPORT_CALLS):
            item.add_marker(pytest.mark.slow)
