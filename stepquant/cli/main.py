"""Entry points `stepquant` (subcommands) and `export-quantized` (the export command alone).

Every expected failure (bad model, bad bundle, bad option value, calibration or parity failure)
ends in one `error:` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import sys

import typer

from stepquant.calibrators import CalibrationError
from stepquant.cli.evaluate import bench_command, eval_command, inspect_command
from stepquant.cli.export import export_command
from stepquant.cli.prompts import encode_prompts_command
from stepquant.cli.sample import sample_command
from stepquant.cli.signing import keygen_command, sign_command, verify_command
from stepquant.cli.tensorrt import build_engine_command, lint_command, parity_command
from stepquant.export import BundleError, OnnxExportError
from stepquant.export.lint import LintError
from stepquant.export.signing import SignatureError
from stepquant.export.tensorrt import TensorRTUnavailable
from stepquant.models import ModelLoadError
from stepquant.pipeline import ParityError
from stepquant.runtime.corrections import CorrectionError

EXPECTED_ERRORS = (ModelLoadError, BundleError, CalibrationError, ParityError, OnnxExportError, LintError,
                   TensorRTUnavailable, CorrectionError, SignatureError, ValueError, OSError)

app = typer.Typer(help="Quantize diffusion models into deployable Q/DQ ONNX bundles, and run them.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
for name, command in (("export", export_command), ("sample", sample_command), ("eval", eval_command),
                      ("bench", bench_command), ("lint", lint_command), ("parity", parity_command),
                      ("build-engine", build_engine_command), ("inspect", inspect_command),
                      ("encode-prompts", encode_prompts_command), ("keygen", keygen_command), ("sign", sign_command),
                      ("verify", verify_command)):
    app.command(name)(command)


def _fail(prog_name: str, message: str, code: int) -> None:
    print(f"{prog_name}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def _run(app_: typer.Typer, prog_name: str) -> None:
    """Run a typer app, turning usage errors and expected failures into one line and an exit code."""
    try:
        code = typer.main.get_command(app_).main(prog_name=prog_name, standalone_mode=False)
        if isinstance(code, int) and code:  # without standalone mode, an Exit comes back as the return value
            sys.exit(code)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        _fail(prog_name, "aborted", 130)
    except typer.TyperException as err:  # usage errors: unknown option values, missing options
        _fail(prog_name, err.format_message(), getattr(err, "exit_code", 2))
    except EXPECTED_ERRORS as err:
        _fail(prog_name, str(err), 1)


def invoke(prog_name: str, args: list[str]) -> tuple[int, str, str]:
    """Run `stepquant ARGS` (or `export-quantized ARGS`) in this process, as its console script would, and
    return the exit code, stdout and stderr: for tests and tools that run many commands."""
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, [prog_name, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            (export_quantized_main if prog_name == "export-quantized" else main)()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def main() -> None:
    """Entry point of `stepquant`."""
    _run(app, "stepquant")


def export_quantized_main() -> None:
    """Entry point of `export-quantized` (the same command as `stepquant export`)."""
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command()(export_command)
    _run(single, "export-quantized")
