"""Segment parity, the device-side layer-wise check (`stepquant parity --backend onnxruntime|openvino`): every
correct bundle passes on each CPU engine, and each seeded fault, standing in for a faulty engine (the engine runs
the faulted graph, the reference is the bundle's own), is caught by the tolerance meant for it."""

import importlib.util

import pytest
from conftest import ENGINE_BACKENDS, bundle_graph, check_engine, run_cli
from polygraphy.json import load_json

from stepquant.bundle import load_bundle
from stepquant.export.faults import seed_fault
from stepquant.export.parity_policy import parity_policy
from stepquant.export.segments import bundle_segment_runner, check_segments


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
def test_a_correct_bundle_passes_segment_by_segment(demo_bundle, backend):
    result = run_cli("stepquant", "parity", "--bundle", demo_bundle[0], "--backend", backend, "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.lstrip().startswith("segments:")]
    assert f"model.onnx on {backend}" in line and int(line.split(" segments,")[0].split()[-1]) > 50, line
    assert ("end-to-end replay:" in result.stdout) == (backend == "onnxruntime")
    assert result.stdout.rstrip().endswith("parity: PASS")


def last_weight_quantizer(graph) -> str:
    import onnx

    from stepquant.export.onnx_export import quantizer_map

    names = quantizer_map(onnx.load(str(graph)))
    return [name for name in names.values() if name.endswith("weight_quantizer")][-1]


@pytest.mark.parametrize(
    "fault, at_last_layer, backend, finding",
    [
        ("activation scale 2% off", False, "onnxruntime", "codes one step off"),
        ("zero point swapped", False, "openvino", "codes two or more steps off"),
        ("activation 2% off upstream of a quantizer", False, "onnxruntime", "codes one step off"),
        ("weight scale 2% off", False, "openvino", "codes one step off"),
        # after the last activation quantizer nothing is requantized: only the layer's float output shows it
        ("weight scale 2% off", True, "onnxruntime", "relative L2 error"),
        ("weight scale 2% off", True, "openvino", "relative L2 error"),
    ],
)
def test_a_seeded_fault_in_the_engine_is_caught(demo_bundle, tmp_path, fault, at_last_layer, backend, finding):
    if backend == "openvino" and not importlib.util.find_spec("openvino"):
        pytest.skip("OpenVINO not installed")
    graph = bundle_graph(demo_bundle[0], backend)
    engine = tmp_path / "engine.onnx"
    quantizer = seed_fault(graph, engine, fault, last_weight_quantizer(graph) if at_last_layer else None)
    report = check_engine(demo_bundle[0], backend, engine)
    assert not report.passed
    first, found = report.failures[0]
    assert any(finding in f for f in found), (quantizer, first.name, found)
    if at_last_layer:  # the segment of the faulted layer itself
        assert first.name == quantizer.removeprefix("unet.").removesuffix(".weight_quantizer"), first.name


def test_a_graph_without_quantizers_is_refused(demo_bundle):
    bundle = load_bundle(demo_bundle[0])
    with pytest.raises(ValueError, match="has no activation quantizers"):
        check_segments(
            bundle.file(bundle.manifest.reference_graph),
            load_json(bundle.file("parity/inputs.json")),
            bundle_segment_runner("onnxruntime", "all"),
            parity_policy("tensorrt", "int8", "fp32"),
        )


def test_tensorrt_has_no_segment_runner():
    with pytest.raises(ValueError, match="segment checks run on onnxruntime and openvino, not tensorrt"):
        bundle_segment_runner("tensorrt", "all")


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.slow  # its bundles come by name, unseen by the tiering in conftest
@pytest.mark.parametrize("kind", ["fp8_bundle", "fp16_bundle"])
def test_fp8_and_fp16_bundles_pass_and_a_weight_fault_is_caught(request, tmp_path, kind, backend):
    """FP8 codes travel as their bits (onnxruntime hands them out as uint8); FP16 graphs round in FP16."""
    path = request.getfixturevalue(kind)[0]
    assert check_engine(path, backend).passed
    engine = tmp_path / "engine.onnx"
    seed_fault(bundle_graph(path, backend), engine, "weight scale 2% off")
    assert not check_engine(path, backend, engine).passed


def test_an_engine_that_cannot_run_a_segment_fails_naming_it(demo_bundle):
    def runner(path):
        def run(feed):
            raise RuntimeError("[CPU] PowerStatic node: unsupported src_prc: f8e4m3")

        return run

    bundle = load_bundle(demo_bundle[0])
    with pytest.raises(ValueError, match=r"the engine cannot run segment \S+: \[CPU\] PowerStatic node: unsupported"):
        check_segments(
            bundle.file("model.onnx"),
            load_json(bundle.file("parity/inputs.json")),
            runner,
            parity_policy("tensorrt", "int8", "fp32"),
        )
