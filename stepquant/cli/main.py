"""Entry points `stepquant` (subcommands) and `export-quantized` (the export command alone).

Every expected failure (bad model, bad bundle, bad option value, calibration or parity failure)
ends in one `error:` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys

import typer

from stepquant.errors import StepquantError

# Every expected failure: bad input is a ValueError (BundleError, CorrectionError, SignatureError... are),
# the rest a StepquantError; OSError for files.
EXPECTED_ERRORS = (StepquantError, ValueError, OSError)
# What `pip install 'stepquant[export]'` adds; a command that needs one of them says so in one line.
EXPORT_MODULES = frozenset(
    {"torch", "diffusers", "onnx", "onnxconverter_common", "polygraphy", "matplotlib", "transformers", "sklearn"}
)
EXPORT_EXTRA = "pip install 'stepquant[export]'"

# name -> (module, function): imported only when that command runs (or --help lists it), so running a
# bundle imports the runtime and nothing of the export side
COMMANDS = {
    "export": ("stepquant.cli.export", "export_command"),
    "sample": ("stepquant.cli.sample", "sample_command"),
    "generate": ("stepquant.cli.generate", "generate_command"),
    "eval": ("stepquant.cli.evaluate", "eval_command"),
    "bench": ("stepquant.cli.bench", "bench_command"),
    "lint": ("stepquant.cli.tensorrt", "lint_command"),
    "parity": ("stepquant.cli.tensorrt", "parity_command"),
    "build-engine": ("stepquant.cli.tensorrt", "build_engine_command"),
    "add-sampler": ("stepquant.cli.samplers", "add_sampler_command"),
    "inspect": ("stepquant.cli.inspect", "inspect_command"),
    "encode-prompts": ("stepquant.cli.prompts", "encode_prompts_command"),
    "keygen": ("stepquant.cli.signing", "keygen_command"),
    "sign": ("stepquant.cli.signing", "sign_command"),
    "verify": ("stepquant.cli.signing", "verify_command"),
}


class MissingExtra(StepquantError):
    """A command needs a package of the export side that this install lacks."""


def missing_extra(err: ModuleNotFoundError, what: str) -> MissingExtra | None:
    """The one-line error for a missing export-side package, or None when `err` is about something else."""
    if (err.name or "").split(".")[0] not in EXPORT_MODULES:
        return None
    return MissingExtra(
        f"{what} needs the export side, which this install lacks (no module {err.name!r}): {EXPORT_EXTRA}"
    )


def _command(name: str, function) -> typer.Typer:
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name, context_settings=getattr(function, "context_settings", None))(function)
    return single


def _load(name: str, label: str | None = None):
    """A command's function, or, where its module needs a missing extra, one that says which to install
    (naming the command as `label`, default `stepquant NAME`)."""
    module, function = COMMANDS[name]
    try:
        return getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as err:
        problem = missing_extra(err, label or f"stepquant {name}")
        if problem is None:
            raise

        def unavailable(ctx: typer.Context) -> None:
            raise problem

        unavailable.__doc__ = (
            "(needs the export side: pip install 'stepquant\\[export]')"  # \[ : a bracket, not rich markup
        )
        unavailable.context_settings = {
            "ignore_unknown_options": True,
            "allow_extra_args": True,
        }  # any options: one line
        return unavailable


def click_command(name: str):
    """The click command behind `stepquant NAME` (for tools and tests that parse its options)."""
    return typer.main.get_command(_command(name, _load(name)))


def _full_app() -> typer.Typer:
    """Every command, for `stepquant --help` and for usage errors."""
    app = typer.Typer(
        help="Quantize diffusion models into deployable Q/DQ ONNX bundles, and run them.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for name in COMMANDS:
        app.command(name)(_load(name))
    return app


def _fail(prog_name: str, message: str, code: int) -> None:
    print(f"{prog_name}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def _run(app: typer.Typer, prog_name: str, args: list[str] | None = None, usage_name: str | None = None) -> None:
    """Run a typer app, turning usage errors and expected failures into one line and an exit code."""
    try:
        command = typer.main.get_command(app)
        code = command.main(args=args, prog_name=usage_name or prog_name, standalone_mode=False)
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
    except ModuleNotFoundError as err:
        problem = missing_extra(err, prog_name if prog_name != "stepquant" else "this command")
        if problem is None:
            raise
        _fail(prog_name, str(problem), 1)


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
    """Entry point of `stepquant`: a subcommand imports its own module only, so `stepquant sample --bundle`
    loads the runtime and nothing of the export side."""
    args = sys.argv[1:]
    if args and args[0] in COMMANDS:
        _run(_command(args[0], _load(args[0])), "stepquant", args[1:], f"stepquant {args[0]}")
    else:
        _run(_full_app(), "stepquant", args)


def export_quantized_main() -> None:
    """Entry point of `export-quantized` (the same command as `stepquant export`)."""
    _run(_command("export-quantized", _load("export", "export-quantized")), "export-quantized", sys.argv[1:])
