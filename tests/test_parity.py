"""Parity on the demo model: the layer-wise gate as the export records it, the end-to-end figures kept for
replays (Polygraphy), the replay itself, and what stops an export."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from polygraphy.comparator import IterationResult, RunResults
from polygraphy.json import load_json, save_json

from stepquant.bundle import Manifest, load_bundle
from stepquant.bundle.reader import MANIFEST
from stepquant.export.bundle import write_manifest
from stepquant.export.config import CalibrationConfig, ChecksConfig
from stepquant.export.parity import ParityReport, TimestepParity, compare_runs, replay_parity
from stepquant.export.parity_policy import parity_policy
from stepquant.pipeline import FP_TOLERANCE, REPLAY_MARGIN, replay_tolerance


def test_demo_bundle_passes_the_layerwise_gate(demo_bundle):
    _, report = demo_bundle
    assert report.parity_passed and report.fp_parity.passed
    (layerwise,) = report.primary.layerwise
    assert layerwise.policy == parity_policy("tensorrt", "int8", "fp32")
    summary = layerwise.to_dict()
    assert summary["activation_quantizers"] > 50 and summary["weight_quantizers"] > 20
    assert summary["codes_compared"] > 10**6 and summary["codes_multi_step_off"] == 0
    assert summary["feeds"] == len(report.end_to_end.timesteps) >= 3
    for entry in report.fp_parity.timesteps:
        assert entry.median_reldiff <= FP_TOLERANCE, entry


def test_parity_figures_and_replay_data_are_in_the_bundle(demo_bundle):
    path, report = demo_bundle
    bundle = load_bundle(path)
    recorded = bundle.target("tensorrt").parity
    assert recorded["gate"] == "layer-wise" and recorded["passed"]
    assert recorded["layerwise"][0]["codes_compared"] == report.primary.layerwise[0].to_dict()["codes_compared"]
    end_to_end = recorded["end_to_end"]
    assert len(end_to_end["timesteps"]) == len(report.end_to_end.timesteps) and end_to_end["passed"]
    inputs = load_json(bundle.file("parity/inputs.json"))
    references = RunResults.load(str(bundle.file("parity/reference_outputs.json")))
    assert len(inputs) == len(end_to_end["timesteps"])
    ((_, iterations),) = references.items()
    assert len(iterations) == len(inputs)
    assert {float(feed["timestep"][0]) for feed in inputs} == {t["timestep"] for t in end_to_end["timesteps"]}
    assert np.isfinite(iterations[0]["eps"]).all()


def test_replay_on_onnxruntime_reproduces_the_export_figures(demo_bundle):
    path, report = demo_bundle
    replayed = replay_parity(load_bundle(path), "onnxruntime")
    assert replayed.passed and replayed.tolerance_median_rel == report.end_to_end.tolerance_median_rel
    for now, then in zip(replayed.timesteps, report.end_to_end.timesteps):
        assert now.timestep == then.timestep
        assert now.median_reldiff == pytest.approx(then.median_reldiff, rel=1e-6, abs=1e-9)


def test_replay_tolerance_is_a_margin_over_the_export_figures_with_a_floor():
    policy = parity_policy("tensorrt", "int8", "fp32")

    def measured(median: float) -> ParityReport:
        return ParityReport(float("inf"), 0.99, [TimestepParity(500.0, [4, 1, 16, 16], median, median, median, True)])

    assert replay_tolerance(policy, [measured(1e-6)]) == policy.replay_floor
    assert replay_tolerance(policy, [measured(1e-6), measured(0.03)]) == pytest.approx(REPLAY_MARGIN * 0.03)


def test_comparison_fails_when_outputs_drift(demo_bundle):
    path, _ = demo_bundle
    bundle = load_bundle(path)
    feeds = load_json(bundle.file("parity/inputs.json"))
    reference = RunResults.load(str(bundle.file("parity/reference_outputs.json")))
    name, iterations = reference[0]
    drifted = [IterationResult({"eps": np.asarray(it["eps"]) * 1.01}, runner_name="drifted") for it in iterations]
    report = compare_runs(RunResults([("drifted", drifted), (name, iterations)]), feeds, 1e-3)
    assert not report.passed
    assert all(t.median_reldiff == pytest.approx(0.01, rel=1e-3) for t in report.timesteps)
    assert all(t.quantile_reldiff == pytest.approx(0.01, rel=1e-3) for t in report.timesteps)
    assert compare_runs(RunResults([("drifted", drifted), (name, iterations)]), feeds, 0.02).passed
    assert compare_runs(RunResults([("drifted", drifted), (name, iterations)]), feeds).judged(1e-3).passed is False


def _resigned_copy(source: Path, destination: Path, edit) -> Path:
    """A copy of a bundle with `edit(directory)` applied and its manifest rewritten, as an exporter would."""
    shutil.copytree(source, destination)
    edit(destination)
    manifest = json.loads((destination / MANIFEST).read_text())
    (destination / MANIFEST).unlink()
    write_manifest(destination, Manifest.from_dict(manifest))
    return destination


def test_parity_inputs_of_the_wrong_shape_are_refused_in_one_line(demo_bundle, tmp_path):
    def cut_sample(directory: Path) -> None:
        feeds = load_json(directory / "parity" / "inputs.json")
        feeds[0]["sample"] = feeds[0]["sample"][:, :, :4]
        save_json(feeds, directory / "parity" / "inputs.json")

    bundle = _resigned_copy(demo_bundle[0], tmp_path / "wrong-shapes", cut_sample)
    assert_one_line_error(
        run_cli("stepquant", "parity", "--bundle", bundle),
        "sample of shape [4, 1, 4, 16] is outside the graph's inputs",
    )


def test_the_parity_command_says_which_check_it_runs(demo_bundle):
    result = run_cli("stepquant", "parity", "--bundle", demo_bundle[0])
    assert result.returncode == 0, result.stderr
    assert "end-to-end replay" in result.stdout and "at export: layer-wise check PASS" in result.stdout
    assert result.stdout.rstrip().endswith("parity: PASS")


def test_a_wrong_graph_stops_the_export_unless_allowed(tiny_model_dir, tmp_path, monkeypatch):
    """An export that wrote a wrong scale (seeded after the real export) is refused, and nothing is left."""
    from conftest import FEW_STEPS

    import stepquant.pipeline as pipeline
    from stepquant.export.faults import seed_fault
    from stepquant.pipeline import ExportConfig, ParityError, export_quantized

    export = pipeline.export_at_precision

    def faulty_export(model, path, *args, **kwargs):
        export(model, path, *args, **kwargs)
        seed_fault(path, path, "activation scale 2% off")

    monkeypatch.setattr(pipeline, "export_at_precision", faulty_export)
    config = dict(
        model=str(tiny_model_dir), sampler=FEW_STEPS, calibration=CalibrationConfig(samples=4), progress=False
    )
    with pytest.raises(
        ParityError,
        match="layer-wise parity failed for model.onnx.*QuantizeLinear scale differs from the calibrated one",
    ):
        export_quantized(ExportConfig(out=tmp_path / "strict", **config, checks=ChecksConfig(eval_samples=2)))
    assert not (tmp_path / "strict").exists() and list(tmp_path.iterdir()) == []
    report = export_quantized(
        ExportConfig(out=tmp_path / "kept", **config, checks=ChecksConfig(eval_samples=2, require_parity=False))
    )
    assert not report.parity_passed
    recorded = load_bundle(tmp_path / "kept").target("tensorrt").parity
    assert recorded["passed"] is False and recorded["layerwise"][0]["failures"]
