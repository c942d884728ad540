"""Target profiles: one frozen record per placement target, saying which Q/DQ graph a calibrated model becomes,
how onnxruntime runs it, how it is checked at export, and which runtime backends prefer it.

The table is torch-free: bundles and the runtime read it. What a profile does to a torch model (the
retargeted copy, the refusal of a model it cannot serve) lives in `stepquant.export.targets` and follows the
profile's fields, never its name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class TargetProfile:
    """`graph_suffix` and `parity_folder` keep one profile's files apart from another's in a bundle; `runs_on`
    names the backends (`backend` or `backend:provider`) that run this profile's graph when the bundle holds it."""

    name: str
    graph_suffix: str  # model.onnx -> model{suffix}.onnx
    parity_folder: str  # parity/gN/{folder}: the replay's saved inputs and outputs for this profile's graphs
    optimization_level: str  # onnxruntime's graph optimisation level for this profile's graphs
    formats: tuple[str, ...]  # quantization formats it serves
    precisions: tuple[str, ...]  # float compute precisions it serves
    tensorrt_rules: bool  # checked against TensorRT's explicit-quantization rules; TensorRT engines are built from it
    integer_kernels: bool  # placed for onnxruntime's fused integer kernels (UINT8 activations, output quantizers)
    runs_on: tuple[str, ...]

    def graph_file(self, base: str) -> str:
        """`model.onnx` -> `model_cpu.onnx` for the onnxruntime-cpu graph; TensorRT keeps the base name."""
        stem, dot, ext = base.rpartition(".")
        return f"{stem}{self.graph_suffix}{dot}{ext}"

    def parity_dir(self, base: str) -> str:
        return f"{base}/{self.parity_folder}" if self.parity_folder else base

    def serves(self, format: str, precision: str) -> bool:
        return format in self.formats and precision in self.precisions


# The tensorrt graph is the exact reference on onnxruntime: run as written ('basic' folds constants only), since
# at 'all' onnxruntime swaps its DQ -> MatMul pairs for integer kernels whose U8S8 path saturates 16-bit pair sums
# on x86 CPUs without VNNI (vpmaddubsw; a tiny SDXL-style UNet lost 3 dB on an AVX2 AMD EPYC), and FP8 Q/DQ runs
# on the CPU provider at 'basic' at most. The onnxruntime-cpu graph exists for those integer kernels: 'all'.
TENSORRT = TargetProfile(
    "tensorrt",
    graph_suffix="",
    parity_folder="",
    optimization_level="basic",
    formats=("int8", "fp8"),
    precisions=("fp32", "fp16"),
    tensorrt_rules=True,
    integer_kernels=False,
    runs_on=("tensorrt", "openvino", "onnxruntime"),
)
ONNXRUNTIME_CPU = TargetProfile(
    "onnxruntime-cpu",
    graph_suffix="_cpu",
    parity_folder="onnxruntime-cpu",
    optimization_level="all",
    formats=("int8",),
    precisions=("fp32",),
    tensorrt_rules=False,
    integer_kernels=True,
    runs_on=("onnxruntime:cpu",),
)
TARGETS: dict[str, TargetProfile] = {profile.name: profile for profile in (TENSORRT, ONNXRUNTIME_CPU)}
# the profile a backend falls back to when the bundle lacks the one it prefers: the graph every backend can run
FALLBACK = TENSORRT


class TargetError(ValueError):
    """The model or export settings cannot serve the requested target."""


def target_profile(name: str) -> TargetProfile:
    if name not in TARGETS:
        raise TargetError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[name]


def preferred_target(available: Iterable[str], backend: str, provider: str = "cpu") -> str:
    """The profile `backend` (with onnxruntime's `provider`) runs among the `available` ones: the most specific
    profile that names it (the CPU profile's integer kernels for onnxruntime on the CPU), else the fallback."""
    available = set(available)
    present = [profile for name, profile in TARGETS.items() if name in available]
    for key in (f"{backend}:{provider}", backend):
        for profile in present:
            if key in profile.runs_on:
                return profile.name
    return FALLBACK.name
