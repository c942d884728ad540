"""Every case of tools/robustness.py as a test of its own: a hostile or bad input through the commands ends in a
non-zero exit and one line naming the problem, with no traceback, nothing written or deleted in the sandbox, and
no file outside the bundle opened. The script runs the same cases and writes the robustness page."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
try:
    import robustness
finally:
    sys.path.pop(0)

CASES = robustness.cases()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robustness").resolve()
    robustness.prepare(root)
    robustness.watch_opens()
    return root


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c.category}: {c.name}" for c in CASES])
def test_the_case_holds(sandbox, index):
    held, said = robustness.run(CASES[index], sandbox, index)
    assert held, said


def test_the_cases_cover_every_category():
    assert len(CASES) >= 200
    assert len({case.category for case in CASES}) >= 7
    assert len({(case.category, case.name) for case in CASES}) == len(CASES)  # each case named once
