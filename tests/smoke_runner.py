"""Run tools/ scripts' --smoke modes one after another in this one process (torch and diffusers imported once,
not once per script), each as `python tools/SCRIPT --smoke` would run it, with its own temporary folder, cwd
and output captured; print one JSON line per script: its exit code, stdout and stderr.

    python tests/smoke_runner.py SCRATCH SCRIPT...
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
import tempfile
import traceback
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def exit_code(stop: SystemExit, err: io.StringIO) -> int:
    """What the interpreter would exit with (a message is printed to stderr and gives 1)."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=err)
    return 1


def run(script: str, scratch: Path) -> dict:
    import torch

    folder = scratch / script.removesuffix(".py")
    folder.mkdir(parents=True)
    out, err = io.StringIO(), io.StringIO()
    argv, cwd, path, deterministic = sys.argv, os.getcwd(), list(sys.path), torch.are_deterministic_algorithms_enabled()
    sys.argv, sys.path[:0] = [str(TOOLS / script), "--smoke"], [str(TOOLS)]
    tempfile.tempdir = str(folder)
    os.chdir(folder)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(TOOLS / script), run_name="__main__")
            except SystemExit as stop:
                code = exit_code(stop, err)
            except BaseException:  # noqa: BLE001 - a script's failure is its result
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.path[:] = argv, path
        tempfile.tempdir = None
        os.chdir(cwd)
        torch.use_deterministic_algorithms(deterministic)
    return {"script": script, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    scratch = Path(sys.argv[1])
    for script in sys.argv[2:]:
        print(json.dumps(run(script, scratch)), flush=True)


if __name__ == "__main__":
    main()
