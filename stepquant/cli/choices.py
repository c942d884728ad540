"""The closed sets of option values the commands accept (typer shows them in --help and refuses others)."""

from enum import Enum


class Observer(str, Enum):
    max = "max"
    percentile = "percentile"
    mse = "mse"


class Format(str, Enum):
    int8 = "int8"
    fp8 = "fp8"


class RuntimeBackend(str, Enum):
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


class Target(str, Enum):
    tensorrt = "tensorrt"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


class Scheduler(str, Enum):
    ddim = "ddim"
    ddpm = "ddpm"


class Correction(str, Enum):
    none = "none"
    ptqd = "ptqd"
    d2_deterministic = "d2-deterministic"
    d2_stochastic = "d2-stochastic"
    tac = "tac"
