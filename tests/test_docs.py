"""The docs cannot rot silently: every repository path and every `--option` that README.md and docs/ name exists,
and the CLI reference is what the commands say today. Each check is also shown to fail on a seeded fault."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from stepquant.cli.main import COMMANDS, click_command

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted((ROOT / "examples").rglob("README.md")),
    ROOT / "tools" / "README.md",
]
REPO_PATH = re.compile(r"(?<![\w./-])((?:stepquant|tools|tests|docs|examples)/[\w./-]*[\w/])")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][A-Za-z0-9-]*[A-Za-z0-9])")
# options of other programs the docs show (pip, trtexec, Polygraphy, torchrun, pytest, python's argparse tools)
OTHER_PROGRAMS = {
    "--load-inputs",
    "--load-outputs",
    "--check-error-stat",
    "--rtol",
    "--trt",
    "--model-type",
    "--standalone",
    "--nproc-per-node",
    "--no-python",
    "--stronglyTyped",
    "--help",
    "--quiet",
    "--disable-pip-version-check",
    "--index-url",
    "--extra-index-url",
    "--target-dir",
    "--quantize-mha",
}  # the last: modelopt's


def stale_paths(text: str, page: Path) -> list[str]:
    """Repository paths and relative links in `text` (a page at `page`) that name nothing in the repository."""
    found = [(ROOT / p.rstrip("/"), p) for p in REPO_PATH.findall(text)]
    found += [(page.parent / link, link) for link in LINK.findall(text) if "://" not in link]
    return sorted({name for path, name in found if not path.exists()})


def known_options() -> set[str]:
    options = set(OTHER_PROGRAMS)
    for name in COMMANDS:
        for param in click_command(name).params:
            options.update(opt for opt in [*param.opts, *getattr(param, "secondary_opts", [])] if opt.startswith("--"))
    for tool in (ROOT / "tools").glob("*.py"):  # the tools' own argparse options
        options.update(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", tool.read_text()))
    return options


def unknown_options(text: str, known: set[str]) -> list[str]:
    return sorted(set(OPTION.findall(text)) - known)


@pytest.fixture(scope="module")
def known() -> set[str]:
    return known_options()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_path_and_option_a_page_names_exists(page, known):
    text = page.read_text()
    assert stale_paths(text, page) == []
    assert unknown_options(text, known) == []


def test_the_checks_catch_a_stale_path_and_an_unknown_option(known):
    page = ROOT / "docs" / "guides" / "getting-started.md"
    seeded = page.read_text() + "\nSee `stepquant/models/attention.py` and [the old page](../BENCHMARKS.md).\n"
    assert stale_paths(seeded, page) == ["../BENCHMARKS.md", "stepquant/models/attention.py"]
    assert unknown_options(seeded + "Run `stepquant sample --frobnicate 3`.\n", known) == ["--frobnicate"]
    assert unknown_options("`stepquant sample --n 4 --no-progress`", known) == []


def test_the_cli_reference_is_current():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from cli_reference import PAGE, render
    finally:
        sys.path.pop(0)
    assert PAGE.read_text() == render(), "docs/reference/cli.md is stale: run python tools/cli_reference.py"
