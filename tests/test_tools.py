"""The scripts under tools/ cannot rot unnoticed: each runs its --smoke mode (small settings, a few seconds of
work) and leaves the project as it was; the CLI reference script's --check agrees with the page; the GPU
machine's check script parses."""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_side_by_side, selected_params

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
# shared code, the CLI reference (its --check is tested below) and the robustness cases (tests/test_robustness.py)
NOT_SMOKED = {"benchdoc.py", "cli_reference.py", "robustness.py"}
SCRIPTS = sorted(p.name for p in TOOLS.glob("*.py") if p.name not in NOT_SMOKED)
PRINTS = {"bench_backends.py": ("Generated ", "ms"), "bench_drop_in.py": ("Generated ", "ms")}  # what it measured
# One smoke run stays in `make test`; all of them take about 8.5 minutes on 2 cores, so the rest are marked `tools`
# and run by `make test-tools` (the suite itself must stay under 10 minutes; bench_backends' 45 s left it too).
IN_THE_SUITE = {"bench_drop_in.py"}
UNTOUCHED = ("stepquant", "docs", "examples", "tools", "tests", "README.md", "pyproject.toml")


def _snapshot() -> dict[str, tuple[int, int]]:
    """Size and mtime of every file of the project's sources and docs (what a smoke run must not write)."""
    files = [
        p
        for top in UNTOUCHED
        for p in ([ROOT / top] if (ROOT / top).is_file() else (ROOT / top).rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    ]
    return {str(p.relative_to(ROOT)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def test_every_script_documents_its_smoke_mode():
    """Its usage line names --smoke (the slow test below runs it, so an undocumented or missing mode fails there)."""
    assert len(SCRIPTS) >= 18
    for script in SCRIPTS:
        usage = ast.get_docstring(ast.parse((TOOLS / script).read_text())) or ""
        assert f"python tools/{script}" in usage and "--smoke" in usage, f"{script}'s usage does not name --smoke"


def _smoke(scripts: list[str], scratch: Path) -> dict[str, dict]:
    """The smoke runs of `scripts`, one after another in one child process (tests/smoke_runner.py): script -> its
    exit code, stdout and stderr."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "smoke_runner.py"), str(scratch), *scripts],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    runs = {}
    for line in result.stdout.splitlines():
        if line.startswith('{"script"'):
            run = json.loads(line)
            runs[run["script"]] = run
    return {
        script: runs.get(script, {"code": result.returncode, "stdout": "", "stderr": result.stderr})
        for script in scripts
    }


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    """Every script's smoke run this session asks for, in one child process per CPU side by side (each imports torch
    and diffusers once for all its scripts), with the project's files as they were before."""
    before = _snapshot()
    scripts = selected_params(request, "test_smoke_mode_runs_and_writes_nothing", "script")
    shares = [scripts[i :: os.cpu_count() or 1] for i in range(min(os.cpu_count() or 1, len(scripts)))]
    futures = run_side_by_side(
        {
            str(i): functools.partial(_smoke, share, tmp_path_factory.mktemp(f"smoke{i}"))
            for i, share in enumerate(shares)
        }
    )
    return before, {script: futures[str(i)] for i, share in enumerate(shares) for script in share}


@pytest.mark.slow
@pytest.mark.parametrize(
    "script",
    [script if script in IN_THE_SUITE else pytest.param(script, marks=pytest.mark.tools) for script in SCRIPTS],
)
def test_smoke_mode_runs_and_writes_nothing(script, smoke_runs):
    before, runs = smoke_runs
    result = runs[script].result()[script]
    assert result["code"] == 0, result["stdout"][-2000:] + result["stderr"][-3000:]
    assert all(fragment in result["stdout"] for fragment in PRINTS.get(script, ("",))) and result["stdout"].strip()
    after = _snapshot()
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert not changed, sorted(changed)[:5]


def test_the_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(TOOLS / "device_check.sh")], capture_output=True).returncode == 0


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
