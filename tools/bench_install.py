"""What a device needs to run a bundle: installed size of a runtime-only virtual environment
(`pip install stepquant`) against the full one (`pip install 'stepquant[export]'`, torch's CPU build), and the
cold start of `stepquant sample --bundle` in each, against the same command before the runtime went numpy
(commit 84e6281, run from a git worktree in the full environment).

Cold start is a fresh process's wall time for `stepquant sample --bundle B --n 1` on the demo bundle:
interpreter start, imports, bundle verification, the onnxruntime session and the sampler's steps (25 steps
of batch 1 take about 0.05 s of it); "import" is the time to import the sample command's module alone.
Medians of several runs after one warm-up run (the file cache is warm, as on a device sampling repeatedly).

    python tools/bench_install.py [--runs 5] [--keep DIR] [--full-python PATH] [--no-before] [--no-write] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import SMOKE_EXPORT, header, parse_options, publish

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "84e6281"  # the last commit whose runtime ran on torch and diffusers
TORCH = "torch==2.13.0"  # the CPU build (see the Makefile)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)


def venv(path: Path, packages: list[str]) -> Path:
    """A fresh virtual environment with `packages` installed (non-editable); its python."""
    run([sys.executable, "-m", "venv", str(path)])
    python = path / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *packages], timeout=3600)
    return python


def size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def timed(command: list[str], runs: int, **kwargs) -> float:
    run(command, **kwargs)  # warm-up: the file cache, as on a device that samples repeatedly
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        run(command, **kwargs)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def before_seconds(
    work: Path, full: Path, sample: list[str], runs: int, import_seconds, remove: bool
) -> tuple[float, float]:
    """The cold start and the import time of the same command with the code of BEFORE (a git worktree, run in the
    full environment, on a bundle of its own format)."""
    old = work / "before"
    if not old.exists():
        run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), BEFORE])
    old_bundle = work / "bundle-before"
    before = {"cwd": old, "env": {**os.environ, "PYTHONPATH": str(old)}}
    if not old_bundle.exists():
        run(
            [
                str(full),
                "-c",
                "import sys; sys.argv = ['export-quantized', *sys.argv[1:]]; "
                "from stepquant.cli.entry import export_quantized; export_quantized()",
                "--out",
                str(old_bundle),
                "--no-progress",
            ],
            timeout=3600,
            **before,
        )
    seconds = timed(
        [
            str(full),
            "-c",
            "import sys; sys.argv=['stepquant', *sys.argv[1:]]; from stepquant.cli.entry import stepquant; stepquant()",
            *sample,
            "--bundle",
            str(old_bundle),
        ],
        runs,
        **before,
    )
    imported = import_seconds(full, **before)
    if remove:
        run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)])
    return seconds, imported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--keep", type=Path, help="build the environments here and keep them (default: a temporary directory)"
    )
    parser.add_argument(
        "--full-python", type=Path, help="measure this existing full environment's python instead of building one"
    )
    parser.add_argument("--no-before", action="store_true", help=f"leave out the comparison with {BEFORE}")
    parser.add_argument(
        "--no-write", action="store_true", help="print the table without updating its docs/benchmarks page"
    )
    args = parse_options(parser, runs=1, full_python=Path(sys.executable), no_before=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runtime = venv(work / "runtime", [str(ROOT)])
        full = args.full_python or venv(work / "full", [TORCH, f"{ROOT}[export]"])
        pythons = {"runtime": runtime, "full": full}
        sizes = {name: size_mib(python.parents[1]) for name, python in pythons.items()}
        packages = {
            name: len(run([str(python), "-m", "pip", "list", "--format=freeze"]).stdout.splitlines())
            for name, python in pythons.items()
        }

        bundle = work / "bundle"
        if not bundle.exists():
            run(
                [
                    str(full.parent / "export-quantized"),
                    "--out",
                    str(bundle),
                    "--no-progress",
                    *(SMOKE_EXPORT if args.smoke else ()),
                ],
                timeout=3600,
            )
        out = work / "s.npz"
        sample = ["sample", "--n", "1", "--no-progress", "--out", str(out)]
        probe = "import time; t = time.perf_counter(); import stepquant.cli.sample; print(time.perf_counter() - t)"

        def import_seconds(python: Path, **kwargs) -> float:
            run([str(python), "-c", probe], **kwargs)
            return statistics.median(float(run([str(python), "-c", probe], **kwargs).stdout) for _ in range(args.runs))

        start = {
            "runtime only (this version)": timed(
                [str(runtime.parent / "stepquant"), *sample, "--bundle", str(bundle)], args.runs
            ),
            "full install (this version)": timed(
                [str(full.parent / "stepquant"), *sample, "--bundle", str(bundle)], args.runs
            ),
        }
        imports = {
            "runtime only (this version)": import_seconds(runtime),
            "full install (this version)": import_seconds(full),
        }
        if not args.no_before:
            start[f"full install ({BEFORE}, before)"], imports[f"full install ({BEFORE}, before)"] = before_seconds(
                work, full, sample, args.runs, import_seconds, remove=not args.keep
            )
    ratio = sizes["runtime"] / sizes["full"]
    lines = [
        header(),
        "",
        "| virtual environment | installed size | packages |",
        "|---|---|---|",
        f"| `pip install stepquant` (runtime only) | {sizes['runtime']:.0f} MiB | {packages['runtime']} |",
        f"| `pip install 'stepquant[export]'` with `{TORCH}` (CPU build) | {sizes['full']:.0f} MiB | "
        f"{packages['full']} |",
        "",
        f"Runtime-only is {100 * ratio:.1f}% of the full environment (target: at most 25%).",
        "",
        "Cold start of `stepquant sample --bundle <demo bundle> --n 1` (25 DDIM steps, batch 1), median of "
        f"{args.runs} runs:",
        "",
        "| install | whole command | import of the sample command |",
        "|---|---|---|",
    ]
    for label in start:
        lines.append(f"| {label} | {start[label]:.2f} s | {imports[label]:.2f} s |")
    publish("install", lines, write=not args.no_write)


if __name__ == "__main__":
    main()
