"""Every example under examples/ runs as its README says, at small settings (FAST), and ends well."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_side_by_side, selected_params

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.is_dir())
FAST = "--steps 4 --calib-samples 4 --eval-samples 4"


def test_every_example_has_a_readme_and_one_script():
    assert len(EXAMPLES) >= 7
    for example in EXAMPLES:
        readme = (example / "README.md").read_text()
        scripts = [p.name for p in example.iterdir() if p.suffix in (".sh", ".py")]
        assert "## Introduction" in readme and "## Running the example" in readme and len(scripts) == 1
        assert f"examples/{example.name}/{scripts[0]}" in readme  # the README runs the script that is there


def _run(example: Path, out: Path) -> subprocess.CompletedProcess:
    script = next(p for p in example.iterdir() if p.suffix in (".sh", ".py"))
    command = ["bash", str(script)] if script.suffix == ".sh" else [sys.executable, str(script)]
    env = {
        **os.environ,
        "OUT": str(out),
        "FAST": FAST,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def example_runs(request, tmp_path_factory):
    """Every example this session runs, started side by side (each in its own output folder)."""
    return run_side_by_side(
        {
            example.name: functools.partial(_run, example, tmp_path_factory.mktemp(example.name))
            for example in selected_params(request, "test_the_example_runs", "example")
        }
    )


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_example_runs(example, example_runs):
    result = example_runs[example.name].result()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
