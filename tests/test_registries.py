"""The name -> implementation tables stay in step with each other, and target names are compared only in the
target registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stepquant.bundle.targets import TARGETS, TargetError, preferred_target, target_profile
from stepquant.calibrators.calibrate import CALIBRATORS, RECONSTRUCTION_CALIBRATORS, TRAJECTORY_CALIBRATORS
from stepquant.calibrators.corrections import ESTIMATORS, estimate_corrections
from stepquant.calibrators.observers import OBSERVERS, RangeObserver
from stepquant.quant.grid import IntGrid
from stepquant.runtime.bundle_backends import ENGINES
from stepquant.runtime.corrections import METHODS

PACKAGE = Path(__file__).resolve().parents[1] / "stepquant"
# a target's name compared or looked up by hand instead of through its record's fields
TARGET_NAME_TEST = re.compile(
    r"""(target\w*\s*[!=]=\s*|in\s+\S*targets\b.*)["'](%s)["']|["'](%s)["']\s+(not\s+)?in\s"""
    % ("|".join(TARGETS), "|".join(TARGETS))
)


def name_tests(source: str) -> list[str]:
    return [line.strip() for line in source.splitlines() if TARGET_NAME_TEST.search(line)]


def test_the_runtime_applies_every_correction_the_export_estimates():
    assert tuple(ESTIMATORS) == METHODS


def test_an_unknown_correction_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="choose from none, ptqd"):
        estimate_corrections("ptqd2", None, None, {}, [0], (1, 2, 2), None)


def test_every_calibrator_names_an_observer_and_trajectory_calibrators_reconstruct_first():
    assert all(calibrator.observer in OBSERVERS for calibrator in CALIBRATORS.values())
    assert set(TRAJECTORY_CALIBRATORS) < set(RECONSTRUCTION_CALIBRATORS)
    assert {"minmax", "percentile", "mse", "reconstruct", "multistep", "mixed-order"} == set(CALIBRATORS)


def test_observers_from_one_histogram():
    import torch

    observer = RangeObserver("x")
    observer.update(torch.cat([torch.linspace(0, 1, 10_000), torch.tensor([8.0])]))
    grid = IntGrid(8, narrow=True)
    assert observer.amax("max", grid) == 8.0
    assert observer.amax("percentile", grid, 99.0) < 1.01
    assert 0.5 < observer.amax("mse", grid) < 8.0
    with pytest.raises(ValueError, match="choose from max, percentile, mse"):
        observer.amax("entropy", grid)


def test_target_profiles_keep_their_files_apart():
    assert len({p.graph_file("model_g0.onnx") for p in TARGETS.values()}) == len(TARGETS)
    assert len({p.parity_dir("parity/g0") for p in TARGETS.values()}) == len(TARGETS)
    assert target_profile("onnxruntime-cpu").graph_file("model_g1.onnx") == "model_g1_cpu.onnx"
    with pytest.raises(TargetError, match="choose from tensorrt, onnxruntime-cpu"):
        target_profile("openvino")


@pytest.mark.parametrize(
    "available, backend, provider, expected",
    [
        (("tensorrt", "onnxruntime-cpu"), "onnxruntime", "cpu", "onnxruntime-cpu"),  # integer kernels on the CPU
        (("tensorrt", "onnxruntime-cpu"), "onnxruntime", "cuda", "tensorrt"),
        (("tensorrt", "onnxruntime-cpu"), "openvino", "cpu", "tensorrt"),  # OpenVINO is fastest on the Q/DQ graph
        (("tensorrt", "onnxruntime-cpu"), "tensorrt", "cpu", "tensorrt"),
        (("tensorrt",), "onnxruntime", "cpu", "tensorrt"),  # the fallback every backend runs
    ],
)
def test_each_backend_runs_the_profile_it_prefers(available, backend, provider, expected):
    assert preferred_target(available, backend, provider) == expected
    assert backend in ENGINES


def test_no_target_name_is_compared_outside_the_registry():
    offenders = {
        path.relative_to(PACKAGE).as_posix(): name_tests(path.read_text())
        for path in PACKAGE.rglob("*.py")
        if path != PACKAGE / "bundle" / "targets.py"
    }
    assert not {path: lines for path, lines in offenders.items() if lines}
    # seeded: what the scan must catch
    assert name_tests('if target == "tensorrt":') and name_tests('if "onnxruntime-cpu" in self.targets:')
    assert name_tests('    if options.provider == "cpu" and "onnxruntime-cpu" in bundle.manifest.targets:')
    assert not name_tests('if backend == "tensorrt":')  # a backend's name is not a target's
