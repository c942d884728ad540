"""Runtime backends behind one contract: OpenVINO runs a bundle's graphs as onnxruntime does, `auto` picks by
the documented order, onnxruntime's GPU providers and a missing OpenVINO are refused in one line, and choosing
a backend imports nothing of the others."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import FEW_STEPS, assert_one_line_error, run_cli
from onnx import numpy_helper

from stepquant.bundle import load_bundle
from stepquant.runtime import bundle_table, sample
from stepquant.runtime.bundle_backends import RunOptions, quantized_backend, reference_backend, resolve_backend
from stepquant.runtime.onnxruntime_backend import provider_available
from stepquant.runtime.openvino_backend import OpenVINOBackend

needs_openvino = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("openvino"), reason="OpenVINO not installed"
)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(4.0 / max(float(np.mean((a - b) ** 2)), 1e-12)))


def _median_gain_db(candidate: np.ndarray, reference: np.ndarray, fp: np.ndarray) -> float:
    """Median over seeds of how many dB closer to FP `candidate` is than `reference`: one seed whose quantizer
    ties round the other way moves a pooled PSNR by 2 dB on 8 seeds, the paired median by a tenth of that."""
    return float(np.median([_psnr(c, f) - _psnr(r, f) for c, r, f in zip(candidate, reference, fp)]))


def _coarser_activations(path, out, factor: float = 2.0):
    """The Q/DQ graph at `path` with every activation quantizer's scale times `factor`: an engine that quantizes
    activations a bit coarser than the graph says."""
    model = onnx.load(str(path))
    constants = {init.name: init for init in model.graph.initializer}
    scales = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants}
    for name in scales:
        constants[name].CopyFrom(
            numpy_helper.from_array(numpy_helper.to_array(constants[name]) * np.float32(factor), name)
        )
    onnx.save(model, str(out))
    return out


@needs_openvino
def test_openvino_runs_the_fp32_graph_as_onnxruntime_does(demo_bundle):
    bundle = load_bundle(demo_bundle[0])
    x = np.random.default_rng(0).standard_normal((4, *bundle.manifest.sample_shape)).astype(np.float32)
    t = np.full(4, 500.0, np.float32)
    ours, theirs = reference_backend(bundle, backend="openvino")(x, t), reference_backend(bundle)(x, t)
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4


@needs_openvino
def test_openvino_samples_the_quantized_graph_as_onnxruntime_does(demo_bundle, tmp_path):
    """Same seeds through both engines: OpenVINO's fused integer kernels round differently from the
    simulation (either way: 0.4 dB closer to FP in the median on an AVX-512 VNNI EPYC), but its samples
    are no further from FP than onnxruntime's; a run one bit coarser is caught."""
    bundle = load_bundle(demo_bundle[0])
    table, shape = bundle_table(bundle), bundle.manifest.sample_shape

    def run(backend) -> np.ndarray:
        return sample(backend, table, range(16), shape, FEW_STEPS, progress=False).samples

    by_ort, by_openvino, fp = (
        run(quantized_backend(bundle, target="tensorrt")),
        run(quantized_backend(bundle, backend="openvino")),
        run(reference_backend(bundle)),
    )
    assert _psnr(by_ort, by_openvino) > 35.0
    assert _median_gain_db(by_openvino, by_ort, fp) > -1.0
    coarse = _coarser_activations(
        bundle.file(bundle.target("tensorrt").timestep_groups[0].graph), tmp_path / "coarse.onnx"
    )
    assert _median_gain_db(run(OpenVINOBackend(coarse)), by_ort, fp) < -1.0  # measured -3.4 dB


def test_auto_takes_the_cpu_graph_on_onnxruntime_else_openvino_where_installed(demo_bundle, monkeypatch):
    bundle = load_bundle(demo_bundle[0])  # the tensorrt graph only
    if provider_available("cuda"):
        assert resolve_backend(bundle, "auto")[1].provider == "cuda"
        return
    has_openvino = __import__("importlib").util.find_spec("openvino") is not None
    name, options = resolve_backend(bundle, "auto", RunOptions(threads=1))
    assert name == ("openvino" if has_openvino else "onnxruntime") and options.threads == 1
    targets = bundle.manifest.targets
    with_cpu_graph = dataclasses.replace(
        bundle,
        manifest=dataclasses.replace(bundle.manifest, targets={**targets, "onnxruntime-cpu": targets["tensorrt"]}),
    )
    assert resolve_backend(with_cpu_graph, "auto") == ("onnxruntime", RunOptions())
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert resolve_backend(bundle, "auto") == ("onnxruntime", RunOptions())


def test_missing_openvino_and_a_missing_provider_are_one_line_errors(demo_bundle, tmp_path, monkeypatch):
    out = tmp_path / "s.png"
    cuda = run_cli(
        "stepquant", "sample", "--bundle", demo_bundle[0], "--n", 2, "--provider", "cuda", "--out", out, "--no-progress"
    )
    if not provider_available("cuda"):
        assert_one_line_error(cuda, "--provider cuda needs CUDAExecutionProvider")
    monkeypatch.setitem(sys.modules, "openvino", None)
    missing = run_cli(
        "stepquant",
        "sample",
        "--bundle",
        demo_bundle[0],
        "--n",
        2,
        "--backend",
        "openvino",
        "--out",
        out,
        "--no-progress",
    )
    assert_one_line_error(missing, "OpenVINO is not installed: pip install 'stepquant[openvino]'")
    assert not out.exists()


@needs_openvino
def test_eval_and_bench_run_on_openvino(demo_bundle, tmp_path):
    result = run_cli(
        "stepquant",
        "eval",
        "--bundle",
        demo_bundle[0],
        "--n",
        8,
        "--steps",
        4,
        "--backend",
        "openvino",
        "--out",
        tmp_path / "eval",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["psnr_to_fp_db"] > 30
    bench = run_cli("stepquant", "bench", "--bundle", demo_bundle[0], "--batch", 1, "--threads", 1, "--seconds", 0.2)
    assert bench.returncode == 0, bench.stderr
    assert (
        "openvino FP32" in bench.stdout
        and "x vs openvino FP32" in bench.stdout
        and "onnxruntime tensorrt graph" in bench.stdout
    )
    unknown = run_cli("stepquant", "bench", "--bundle", demo_bundle[0], "--backend", "tensorrt")
    assert_one_line_error(unknown, "'tensorrt' is not a CPU backend")


@pytest.mark.slow
def test_choosing_a_backend_imports_no_other_engine():
    code = (
        "import json, sys; from stepquant.cli import sample, generate, evaluate, bench; "
        "print(json.dumps([m for m in sys.modules if m.split('.')[0] in ('openvino', 'tensorrt')]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(result.stdout) == []
