"""The benchmark scripts cannot rot unnoticed: those with a --smoke mode run it (a quick export, few calls;
nothing written), and the CLI reference script's --check agrees with the page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / script), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_backends.py", "bench_drop_in.py"])
def test_smoke_mode_runs_and_writes_nothing(script, tmp_path):
    page = TOOLS.parent / "docs" / "benchmarks" / ("backends.md" if "backends" in script else "drop-in.md")
    before = page.read_text() if page.exists() else None
    result = _run(script, "--smoke", "--work", str(tmp_path / "work"), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Generated " in result.stdout and "ms" in result.stdout  # it printed its measurements
    assert (page.read_text() if page.exists() else None) == before


def test_cli_reference_check_fails_on_a_stale_page(tmp_path, monkeypatch):
    sys.path.insert(0, str(TOOLS))
    try:
        import cli_reference
    finally:
        sys.path.pop(0)
    stale = tmp_path / "cli.md"
    stale.write_text(cli_reference.render().replace("`--steps`", "`--stepz`", 1))
    monkeypatch.setattr(cli_reference, "PAGE", stale)
    monkeypatch.setattr(sys, "argv", ["cli_reference.py", "--check"])
    with pytest.raises(SystemExit, match="is not current"):
        cli_reference.main()
