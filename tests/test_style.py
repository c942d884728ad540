"""Style is checked, not hoped for: ruff's lint (pyflakes, syntax errors, import order, lines of at most 120
characters) and its formatter pass on the whole project, and a seeded long line is caught."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_project_passes_ruff_lint_and_format():
    lint = _ruff("check", ".")
    assert lint.returncode == 0, lint.stdout
    formatted = _ruff("format", "--check", ".")
    assert formatted.returncode == 0, formatted.stdout


def test_a_line_over_the_limit_is_caught(tmp_path):
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / "long.py").write_text(f"TEXT = '{'a' * 120}'\n")
    lint = _ruff("check", "long.py", cwd=tmp_path)
    assert lint.returncode == 1 and "E501" in lint.stdout
