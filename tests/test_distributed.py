"""Calibration over two processes under torchrun (gloo, CPU): the same minmax scales as one process bit for bit
(at the same threads per process: torch's CPU kernels round differently with their thread count, and torchrun
gives each worker one), only rank 0 writes, and a rank that fails mid-calibration stops every rank with nothing
left behind. Real processes, started as a user starts them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

BIN = Path(sys.executable).parent
TORCHRUN = shutil.which("torchrun", path=str(BIN))
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed beside this Python")
COMMON = (
    "--steps",
    "3",
    "--calib-samples",
    "4",
    "--calib-batch",
    "2",
    "--eval-samples",
    "2",
    "--device",
    "cpu",
    "--no-progress",
)


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def _torchrun(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--no-python", "export-quantized", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _activation_scales(graph: Path) -> dict[str, bytes]:
    model = onnx.load(str(graph))
    constants = {init.name: numpy_helper.to_array(init).tobytes() for init in model.graph.initializer}
    return {node.name: constants[node.input[1]] for node in model.graph.node if node.op_type == "QuantizeLinear"}


def test_two_processes_give_one_process_minmax_scales_bit_for_bit(tiny_model_dir, tmp_path):
    two = _torchrun("--model", tiny_model_dir, "--out", tmp_path / "two", *COMMON, env=_env())
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("bundle:") == 1  # rank 0 reports, rank 1 says nothing
    one = subprocess.run(
        [BIN / "export-quantized", "--model", tiny_model_dir, "--out", tmp_path / "one", *COMMON],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    scales = _activation_scales(tmp_path / "two" / "model.onnx")
    assert scales and scales == _activation_scales(tmp_path / "one" / "model.onnx")
    calibration = json.loads((tmp_path / "two" / "manifest.json").read_text())["calibration"]
    assert calibration["processes"] == 2
    assert (
        calibration["inputs"] == json.loads((tmp_path / "one" / "manifest.json").read_text())["calibration"]["inputs"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # nothing else written, by any rank


@pytest.mark.slow
def test_a_rank_failing_mid_calibration_stops_all_and_leaves_nothing(tiny_model_dir, tmp_path):
    """Rank 1 meets a NaN while observing ranges (seeded here through sitecustomize); rank 0 is stopped and
    removes its staging directory."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from stepquant.calibrators import observers\n"
        "    def update(self, x):\n"
        "        raise FloatingPointError(f'non-finite values (NaN or inf) at the input of {self.name} during "
        "calibration')\n"
        "    observers.RangeObserver.update = update\n"
    )
    out = tmp_path / "out"
    result = _torchrun("--model", tiny_model_dir, "--out", out, *COMMON, env=_env(PYTHONPATH=str(hook)))
    assert result.returncode != 0
    assert "export-quantized: error: non-finite values" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook"]  # no bundle, no staging directory


def test_processes_take_whole_trajectory_batches_and_each_needs_one(monkeypatch):
    from stepquant.calibrators import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.shard(10, 2) == [2, 3, 6, 7]  # batches 1 and 3 of [0,1] [2,3] [4,5] [6,7] [8,9]
    with pytest.raises(
        distributed.DistributedError, match="--calib-samples 2 in batches of 8 .* make 1 batch for 2 processes"
    ):
        distributed.shard(2, 8)
