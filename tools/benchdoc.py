"""Write a generated section into the running script's page, docs/benchmarks/<script>.md (tools/bench_latency.py
-> docs/benchmarks/latency.md), between `<!-- NAME:start -->` and `<!-- NAME:end -->`, so each benchmark script
owns its tables and reruns replace them; the page's hand-written reading stays as it is."""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

SMOKE_STEPS = 4  # sampler steps of a --smoke run
SMOKE_EXPORT = (
    "--steps",
    str(SMOKE_STEPS),
    "--calib-samples",
    "4",
    "--eval-samples",
    "4",
)  # a --smoke run's export: seconds
PAGES = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def page(script: str | None = None) -> Path:
    """The benchmark page of `script` (default: the running one): its name without `bench_`."""
    stem = Path(script or sys.argv[0]).stem
    return PAGES / f"{stem.removeprefix('bench_').replace('_', '-')}.md"


SPEED_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
)  # what decides integer kernels' speed


def machine() -> str:
    """The CPU's name and the flags of SPEED_FLAGS it has, core count, OS and Python: beside every figure."""
    cpu, flags = "unknown CPU", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown CPU":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = [f for f in SPEED_FLAGS if f in line.split(":", 1)[1].split()]
    except OSError:
        pass
    import os

    return (
        f"{cpu} (flags: {' '.join(flags) or 'none of ' + ' '.join(SPEED_FLAGS)}), {os.cpu_count()} logical CPUs, "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"
    )


def header() -> str:
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    return f"Generated {datetime.date.today().isoformat()} by `{command}` on {machine()}.\n"


def write_section(name: str, body: str, doc: Path | None = None) -> None:
    doc = doc or page()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else f"# {doc.stem.replace('-', ' ').capitalize()}\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
    print(f"updated section '{name}' of {doc}")


def parse_options(parser: argparse.ArgumentParser, **smoke) -> argparse.Namespace:
    """The script's options, with `--smoke` added: a quick run that checks the script still works, with the
    options named in `smoke` set to those small values (a callable is called for its value only then) and
    `no_write` set, so nothing of the project is written."""
    shrunk = ", ".join(
        f"--{name.replace('_', '-')} {'a temporary folder' if callable(v) else v}" for name, v in smoke.items()
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"a quick run that checks the script works, writing nothing{f' ({shrunk})' if shrunk else ''}",
    )
    args = parser.parse_args()
    if args.smoke:
        for name, value in smoke.items():
            setattr(args, name, value() if callable(value) else value)
        args.no_write = True
    return args


def scratch() -> Path:
    """A new temporary folder: where a smoke run saves what a full run saves into the project."""
    return Path(tempfile.mkdtemp(prefix="stepquant-smoke-"))


def publish(name: str, lines: list[str], write: bool, doc: Path | None = None) -> None:
    """Print a benchmark's section and, unless told not to (--no-write), put it into its page."""
    text = "\n".join(lines)
    print(text)
    if write:
        write_section(name, text, doc)


def console(command: str, *args: str) -> str:
    """A console script of this environment (stepquant, export-quantized): its stdout, or exit with its error."""
    result = subprocess.run([str(Path(sys.executable).with_name(command)), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{command} {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def export_here(*args: object) -> None:
    """`export-quantized ARGS` run in this process (no Python start-up per bundle), or exit with its error."""
    from stepquant.cli.main import invoke

    code, _, err = invoke("export-quantized", [str(a) for a in args])
    if code:
        raise SystemExit(f"export-quantized {' '.join(map(str, args))} failed:\n{err}")


def work_folder(work: Path | None, prefix: str) -> Path:
    """Where a script keeps its bundles: `--work` (made if missing, reused by a rerun) or a new temporary folder."""
    folder = work or Path(tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
