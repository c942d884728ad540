"""Parity on the demo model, measured with Polygraphy: Q/DQ graph vs fake-quant torch, FP ONNX vs FP torch."""

import numpy as np
from polygraphy.comparator import RunResults
from polygraphy.json import load_json

from stepquant.export import load_bundle
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
    recorded = bundle.manifest["parity"]["qdq"]
    assert recorded["passed"] and len(recorded["timesteps"]) == len(report.qdq_parity.timesteps)
    inputs = load_json(bundle.file("parity/inputs.json"))
    references = RunResults.load(str(bundle.file("parity/reference_outputs.json")))
    assert len(inputs) == len(recorded["timesteps"])
    (_, iterations), = references.items()
    assert len(iterations) == len(inputs)
    assert {float(feed["timestep"][0]) for feed in inputs} == {t["timestep"] for t in recorded["timesteps"]}
    assert np.isfinite(iterations[0]["eps"]).all()
