"""The closed sets of option values the commands accept, built from the package's own constants so the CLI
and the library cannot disagree (typer lists them in --help and refuses anything else). The runtime's sets
are here; the export's (calibrators, formats, targets, precisions) in `export_choices`, so running a bundle
imports nothing of the export side."""

from enum import Enum

from stepquant.runtime.bundle_backends import BACKENDS
from stepquant.runtime.corrections import METHODS as CORRECTION_METHODS
from stepquant.runtime.onnxruntime_backend import OPTIMIZATION_LEVELS, PROVIDERS
from stepquant.runtime.sampler import SCHEDULER_NAMES


def choices(name: str, values) -> type[Enum]:
    return Enum(name, {value: value for value in values}, type=str)


RuntimeBackend = choices("RuntimeBackend", BACKENDS)
ParityBackend = choices("ParityBackend", ("onnxruntime", "openvino", "tensorrt"))  # what `stepquant parity` checks
Scheduler = choices("Scheduler", SCHEDULER_NAMES)
Correction = choices("Correction", CORRECTION_METHODS)
OptimizationLevel = choices("OptimizationLevel", OPTIMIZATION_LEVELS)
Provider = choices("Provider", PROVIDERS)
