"""The base of stepquant's expected failures, so the CLI can end any of them in one line without importing
the modules (and their torch or onnx) that raise them. ValueError subclasses need no mark: bad input is a
ValueError everywhere here."""


class StepquantError(Exception):
    """An expected failure that is not bad input: a calibration that went wrong, a graph that failed parity..."""
