"""The console entry points, kept light: they install signal handling before the package (torch,
onnxruntime, diffusers) is imported, so an interrupt at any moment ends in one line, an exit code, and the
cleanup of whatever was being written (the export's staging directory, a temporary output file).

Ctrl-C (SIGINT) ends with "aborted" and exit code 130; SIGTERM (`timeout`, CI cancellation, `docker stop`)
and SIGHUP (a closed terminal) end with "terminated by SIG..." and 128 + the signal's number, after the same
cleanup.
"""

from __future__ import annotations

import signal
import sys

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(BaseException):
    """A termination signal, raised where the program is so that `finally` blocks and cleanup handlers run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, _frame) -> None:
    for other in _SIGNALS:  # one cleanup: a second signal must not interrupt it
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


def _fail(prog_name: str, message: str, code: int) -> None:
    print(f"{prog_name}: error: {message}", file=sys.stderr)
    sys.exit(code)


def _entry(prog_name: str, attribute: str) -> None:
    # SIGINT too: as a KeyboardInterrupt, click and typer would catch it and return 130 without a word. A
    # signal this process was started ignoring (a background job's SIGINT) stays ignored.
    for signum in _SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)
    try:
        from stepquant.cli import main as cli

        getattr(cli, attribute)()
    except (Interrupted, KeyboardInterrupt) as interrupted:
        signum = getattr(interrupted, "signum", signal.SIGINT)
        _fail(
            prog_name,
            "aborted" if signum == signal.SIGINT else f"terminated by {signal.Signals(signum).name}",
            128 + signum,
        )


def stepquant() -> None:
    """`stepquant`."""
    _entry("stepquant", "main")


def export_quantized() -> None:
    """`export-quantized` (the same command as `stepquant export`)."""
    _entry("export-quantized", "export_quantized_main")
