"""Parity on the demo model, measured with Polygraphy: Q/DQ graph vs fake-quant torch, FP ONNX vs FP torch."""

import numpy as np
import pytest
from polygraphy.comparator import IterationResult, RunResults
from polygraphy.json import load_json

from stepquant.export import load_bundle
from stepquant.export.parity import compare_runs, replay_parity
from stepquant.pipeline import FP_TOLERANCE, QDQ_TOLERANCE


def test_demo_bundle_parity_within_tolerance(demo_bundle):
    _, report = demo_bundle
    assert len(report.qdq_parity.timesteps) >= 3
    for entry in report.qdq_parity.timesteps:
        assert entry.median_reldiff <= QDQ_TOLERANCE, entry
    for entry in report.fp_parity.timesteps:
        assert entry.median_reldiff <= FP_TOLERANCE, entry
    assert report.qdq_parity.passed and report.fp_parity.passed


def test_parity_figures_and_replay_data_are_in_the_bundle(demo_bundle):
    path, report = demo_bundle
    bundle = load_bundle(path)
    recorded = bundle.target("tensorrt")["parity"]
    assert recorded["passed"] and len(recorded["timesteps"]) == len(report.qdq_parity.timesteps)
    inputs = load_json(bundle.file("parity/inputs.json"))
    references = RunResults.load(str(bundle.file("parity/reference_outputs.json")))
    assert len(inputs) == len(recorded["timesteps"])
    (_, iterations), = references.items()
    assert len(iterations) == len(inputs)
    assert {float(feed["timestep"][0]) for feed in inputs} == {t["timestep"] for t in recorded["timesteps"]}
    assert np.isfinite(iterations[0]["eps"]).all()


def test_replay_on_onnxruntime_reproduces_the_export_figures(demo_bundle):
    path, report = demo_bundle
    replayed = replay_parity(load_bundle(path), "onnxruntime", QDQ_TOLERANCE)
    assert replayed.passed
    for now, then in zip(replayed.timesteps, report.qdq_parity.timesteps):
        assert now.timestep == then.timestep
        assert now.median_reldiff == pytest.approx(then.median_reldiff, rel=1e-6, abs=1e-9)


def test_comparison_fails_when_outputs_drift(demo_bundle):
    path, _ = demo_bundle
    bundle = load_bundle(path)
    feeds = load_json(bundle.file("parity/inputs.json"))
    reference = RunResults.load(str(bundle.file("parity/reference_outputs.json")))
    name, iterations = reference[0]
    drifted = [IterationResult({"eps": np.asarray(it["eps"]) * 1.01}, runner_name="drifted") for it in iterations]
    report = compare_runs(RunResults([("drifted", drifted), (name, iterations)]), feeds, QDQ_TOLERANCE)
    assert not report.passed
    assert all(t.median_reldiff == pytest.approx(0.01, rel=1e-3) for t in report.timesteps)
    assert all(t.quantile_reldiff == pytest.approx(0.01, rel=1e-3) for t in report.timesteps)
    assert compare_runs(RunResults([("drifted", drifted), (name, iterations)]), feeds, 0.02).passed


def test_a_failed_qdq_parity_stops_the_export_unless_allowed(tiny_model_dir, tmp_path, monkeypatch):
    import stepquant.pipeline as pipeline
    from stepquant.pipeline import ExportConfig, ParityError, export_quantized
    from tests.conftest import FEW_STEPS

    monkeypatch.setattr(pipeline, "QDQ_TOLERANCE", 0.0)  # nothing float-computed meets a zero tolerance
    config = dict(model=str(tiny_model_dir), sampler=FEW_STEPS, calib_samples=4, eval_samples=2, progress=False)
    with pytest.raises(ParityError, match="allow-parity-failure"):
        export_quantized(ExportConfig(out=tmp_path / "strict", **config))
    assert not (tmp_path / "strict").exists() and list(tmp_path.iterdir()) == []
    report = export_quantized(ExportConfig(out=tmp_path / "kept", require_parity=False, **config))
    assert not report.qdq_parity.passed
    assert load_bundle(tmp_path / "kept").target("tensorrt")["parity"]["passed"] is False
