"""The closed sets of option values the commands accept, built from the package's own constants so
the CLI and the library cannot disagree (typer lists them in --help and refuses anything else)."""

from enum import Enum

from stepquant.calibrators.calibrate import CALIBRATORS
from stepquant.export.precision import PRECISIONS
from stepquant.export.targets import TARGETS
from stepquant.quant.spec import FORMATS
from stepquant.runtime.bundle_backends import BACKENDS
from stepquant.runtime.corrections import METHODS as CORRECTION_METHODS
from stepquant.runtime.onnxruntime_backend import OPTIMIZATION_LEVELS
from stepquant.runtime.sampler import SCHEDULERS


def _choices(name: str, values) -> type[Enum]:
    return Enum(name, {value: value for value in values}, type=str)


Calibrator = _choices("Calibrator", CALIBRATORS)
Format = _choices("Format", FORMATS)
RuntimeBackend = _choices("RuntimeBackend", BACKENDS)
Target = _choices("Target", TARGETS)
Precision = _choices("Precision", PRECISIONS)
Scheduler = _choices("Scheduler", SCHEDULERS)
Correction = _choices("Correction", CORRECTION_METHODS)
OptimizationLevel = _choices("OptimizationLevel", OPTIMIZATION_LEVELS)
