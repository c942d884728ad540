"""The device runtime without the export side: `stepquant sample --bundle` in a process where importing
torch, diffusers, onnx or Polygraphy raises gives the samples the full install gives, for every scheduler
(with corrections) and for a conditional bundle with guidance; importing the runtime loads nothing else."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

from stepquant.export.config import CalibrationConfig, ChecksConfig, ConditioningConfig, CorrectionConfig
from stepquant.models import EpsilonModel, load_model
from stepquant.models.tiny import random_conditioning, save_tiny_pipeline
from stepquant.pipeline import ExportConfig, export_quantized
from stepquant.runtime import SamplerConfig

EXPORT_SIDE = (
    "torch",
    "diffusers",
    "onnx",
    "polygraphy",
    "onnxconverter_common",
    "transformers",
    "matplotlib",
    "sklearn",
)
# the interpreter the device would have: the export side's packages cannot be imported
WITHOUT_EXPORT_SIDE = textwrap.dedent(f"""
    import importlib.abc, sys
    class _Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {set(EXPORT_SIDE)!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, _Refuse())
""")


def run_without_export_side(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_EXPORT_SIDE + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def stepquant_without_export_side(*args) -> subprocess.CompletedProcess:
    return run_without_export_side(f"""
        sys.argv = ["stepquant", *{[str(a) for a in args]!r}]
        from stepquant.cli.main import main
        main()
    """)


RUNTIME_FORBIDDEN = (
    "stepquant.export",
    "stepquant.calibrators",
    "stepquant.models",
    "stepquant.quant",
    "stepquant.pipeline",
    "stepquant.eval",
)


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("stepquant.runtime", RUNTIME_FORBIDDEN),
        ("stepquant.bundle", RUNTIME_FORBIDDEN),
        ("stepquant.cli.sample", RUNTIME_FORBIDDEN),
        ("stepquant.cli.generate", RUNTIME_FORBIDDEN),
        ("stepquant.runtime.text_to_image", RUNTIME_FORBIDDEN),
        # the device's other commands: light modules of the export and eval packages are fine, their libraries are not
        ("stepquant.cli.bench", ()),
        ("stepquant.cli.signing", ()),
    ],
)
def test_importing_the_runtime_loads_nothing_of_the_export_side(module, forbidden):
    result = subprocess.run(
        [sys.executable, "-c", f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded = json.loads(result.stdout)
    assert [m for m in loaded if m.split(".")[0] in EXPORT_SIDE or (forbidden and m.startswith(forbidden))] == []
    assert module in loaded  # the check saw the import


SAMPLERS = {  # every scheduler the project supports, each with a correction
    "ddim": (SamplerConfig("ddim", 4, 0.5), "ptqd"),
    "ddpm": (SamplerConfig("ddpm", 4), "d2-stochastic"),
    "dpm-solver++": (SamplerConfig("dpm-solver++", 4, karras_sigmas=True), "d2-deterministic"),
    "euler": (SamplerConfig("euler", 4), "tac"),
    "euler-ancestral": (SamplerConfig("euler-ancestral", 4), "ptqd"),
    "unipc": (SamplerConfig("unipc", 4), "ptqd"),
}


@pytest.fixture(scope="module", params=list(SAMPLERS))
def corrected_bundle(request, tmp_path_factory):
    sampler, correction = SAMPLERS[request.param]
    out = tmp_path_factory.mktemp("runtime") / f"demo-{request.param}"
    export_quantized(
        ExportConfig(
            out=out,
            sampler=sampler,
            progress=False,
            calibration=CalibrationConfig(samples=8),
            checks=ChecksConfig(eval_samples=4),
            correction=CorrectionConfig(method=correction),
        )
    )
    return out


@pytest.fixture(scope="module")
def conditional_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-conditional")
    pipeline = save_tiny_pipeline("sd", root / "pipeline")
    conditioning = root / "conditioning.safetensors"
    random_conditioning(EpsilonModel(load_model(str(pipeline)).denoiser)).save(conditioning)
    export_quantized(
        ExportConfig(
            model=str(pipeline),
            out=root / "bundle",
            sampler=SamplerConfig(steps=3, guidance_scale=3.0),
            progress=False,
            conditioning=ConditioningConfig(file=conditioning),
            calibration=CalibrationConfig(samples=2),
            checks=ChecksConfig(eval_samples=2),
        )
    )
    return root / "bundle", conditioning


def _same_samples(bundle, tmp_path, *extra) -> None:
    args = ("sample", "--bundle", bundle, "--n", "5", "--batch-size", "2", "--no-progress", *extra)
    full = run_cli("stepquant", *args, "--out", tmp_path / "full.npz")
    assert full.returncode == 0, full.stderr
    device = stepquant_without_export_side(*args, "--out", tmp_path / "device.npz")
    assert device.returncode == 0, device.stderr
    a, b = (np.load(tmp_path / f"{name}.npz")["samples"] for name in ("full", "device"))
    assert a.shape[0] == 5 and np.abs(a - b).max() <= 1e-5


def test_sampling_a_corrected_bundle_needs_no_export_side(corrected_bundle, tmp_path):
    _same_samples(corrected_bundle, tmp_path)


def test_sampling_a_guided_conditional_bundle_needs_no_export_side(conditional_bundle, tmp_path):
    bundle, conditioning = conditional_bundle
    _same_samples(bundle, tmp_path, "--conditioning", conditioning)


def test_bench_verify_and_inspect_need_no_export_side(demo_bundle):
    timed = stepquant_without_export_side("bench", "--bundle", demo_bundle[0], "--batch", "1", "--seconds", "0.2")
    assert timed.returncode == 0, timed.stderr
    assert "tensorrt graph" in timed.stdout and "x vs onnxruntime FP32" in timed.stdout
    verified = stepquant_without_export_side("verify", "--bundle", demo_bundle[0])
    assert verified.returncode == 0 and "files verified" in verified.stdout
    inspected = stepquant_without_export_side("inspect", "--bundle", demo_bundle[0])
    assert inspected.returncode == 0 and "exported without correction terms" in inspected.stdout, inspected.stderr


def test_export_side_commands_say_which_extra_to_install(demo_bundle, tmp_path):
    for args in (
        ("eval", "--bundle", demo_bundle[0], "--n", "4"),
        ("sample", "--model", "demo-digits", "--n", "2", "--out", tmp_path / "fp.npz"),
    ):
        result = stepquant_without_export_side(*args)
        assert_one_line_error(result, "pip install 'stepquant[export]'")
    exported = run_without_export_side("""
        sys.argv = ["export-quantized", "--out", "x"]
        from stepquant.cli.main import export_quantized_main
        export_quantized_main()
    """)
    assert_one_line_error(exported, "pip install 'stepquant[export]'")
    listed = stepquant_without_export_side("--help")
    assert listed.returncode == 0 and "sample" in listed.stdout and "needs the export side" in listed.stdout


def test_bad_runtime_requests_are_one_line(demo_bundle, tmp_path):
    base = ("sample", "--bundle", demo_bundle[0], "--n", "2", "--no-progress", "--out", tmp_path / "x.npz")
    other_steps = stepquant_without_export_side(*base, "--steps", "7")
    assert_one_line_error(other_steps, "stores no")
    other_sampler = stepquant_without_export_side(*base, "--scheduler", "euler")
    assert_one_line_error(other_sampler, "stores no 4 EULER steps sampler; it stores ddim:4")
    if importlib.util.find_spec("tensorrt") is None:
        no_tensorrt = stepquant_without_export_side(*base, "--backend", "tensorrt")
        assert_one_line_error(no_tensorrt, "TensorRT is not installed")
    assert not (tmp_path / "x.npz").exists()


def _module_imports() -> dict[str, set[str]]:
    """Each stepquant module and the stepquant modules it imports at module level (what runs on import)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "stepquant"
    graph = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        imports = set()
        for node in ast.parse(path.read_text()).body:  # top level only: imports inside functions run later
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stepquant"):
                imports.add(node.module)
            elif isinstance(node, ast.Import):
                imports.update(a.name for a in node.names if a.name.startswith("stepquant"))
        graph[name] = imports
    return graph


def test_no_import_cycles_between_stepquant_packages():
    """A cycle works or fails by import order; none may exist between the sub-packages (runtime -> bundle is
    fine, bundle -> runtime would not be)."""

    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for module, imports in _module_imports().items():
        for imported in imports:
            if package(imported) != package(module):
                edges.setdefault(package(module), set()).add(package(imported))
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif len(path) < 12:
                visit(nxt, path + [nxt])

    for start in sorted(edges):
        visit(start, [start])
    assert cycles == []
    assert not {p for p in edges.get("stepquant.runtime", set())} - {"stepquant.bundle", "stepquant.errors"}
