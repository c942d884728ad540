"""Runs an exported graph (FP or Q/DQ) with onnxruntime, on one of its execution providers: the CPU's, or
CUDA's and TensorRT's from the `onnxruntime-gpu` package (installed in place of `onnxruntime`: the two share
one module and cannot be installed side by side).

Session settings that matter for CPU speed are arguments: intra-op threads, the graph optimisation
level, and a cache directory for the optimised graph. Optimising a quantized graph (QDQ fusion into
integer kernels, layout transforms) takes a noticeable part of start-up; with `cache_dir` the first
session writes the optimised graph there, keyed by the model's sha256 and the level, and later sessions
load it with optimisations off. At level "all" the cached graph holds kernels chosen for this CPU, so a
cache belongs to one machine.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from stepquant.errors import StepquantError
from stepquant.runtime.backend import graph_feed

# onnxruntime.GraphOptimizationLevel's members by the names the options use
OPTIMIZATION_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
# --provider names -> the execution providers a session asks for, in onnxruntime's order of preference (the
# CUDA provider runs what TensorRT's cannot)
PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider",),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
}


class ProviderUnavailable(StepquantError, RuntimeError):
    """The onnxruntime installed here lacks the execution provider asked for (or onnxruntime itself)."""


def onnxruntime():
    """The onnxruntime module, or an error naming the extra that installs it."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ProviderUnavailable(
            "onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu for its CUDA "
            "and TensorRT providers)"
        ) from err
    return ort


def graph_optimization_level(name: str):
    """onnxruntime's GraphOptimizationLevel member for an --optimization-level name."""
    if name not in OPTIMIZATION_LEVELS:
        raise ValueError(f"unknown graph optimisation level {name!r}; choose from {', '.join(OPTIMIZATION_LEVELS)}")
    return getattr(onnxruntime().GraphOptimizationLevel, OPTIMIZATION_LEVELS[name])


def provider_available(provider: str) -> bool:
    try:
        return PROVIDERS[provider][0] in onnxruntime().get_available_providers()
    except ProviderUnavailable:
        return False


def _require_provider(ort, provider: str) -> tuple[str, ...]:
    if provider not in PROVIDERS:
        raise ValueError(f"unknown onnxruntime provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    wanted, offered = PROVIDERS[provider], ort.get_available_providers()
    if wanted[0] not in offered:
        raise ProviderUnavailable(
            f"--provider {provider} needs {wanted[0]}, which this onnxruntime {ort.__version__} lacks "
            f"(it offers {', '.join(offered)}): on a machine with an NVIDIA GPU and its CUDA libraries, "
            "pip uninstall onnxruntime, then pip install onnxruntime-gpu"
        )
    return wanted


class OnnxRuntimeBackend:
    def __init__(
        self,
        model_path: str | Path,
        threads: int | None = None,
        provider: str = "cpu",
        optimization_level: str = "all",
        cache_dir: str | Path | None = None,
    ) -> None:
        ort = onnxruntime()
        providers = _require_provider(ort, provider)
        options = ort.SessionOptions()
        options.graph_optimization_level = graph_optimization_level(optimization_level)
        options.log_severity_level = 3  # onnxruntime's notes on dropped initializers and hardware-specific caches
        if threads:
            options.intra_op_num_threads = threads
        self.model_path = path = Path(model_path)
        writing = None
        self.loaded_from_cache = False
        if cache_dir is not None:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            cached = Path(cache_dir) / f"{path.stem}.{digest}.{optimization_level}.onnx"
            if cached.is_file():
                path, self.loaded_from_cache = cached, True
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            else:
                cached.parent.mkdir(parents=True, exist_ok=True)
                writing = cached.with_suffix(".partial")
                options.optimized_model_filepath = str(writing)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as err:  # onnxruntime's own errors (its exception types are not exported)
            raise ValueError(f"onnxruntime cannot load {path}: {' '.join(str(err).split())[:300]}") from err
        if providers[0] not in self.session.get_providers():  # onnxruntime falls back to the CPU with a log line only
            raise ProviderUnavailable(
                f"onnxruntime could not start {providers[0]} for {path.name} (no usable GPU or CUDA "
                "libraries?); run with --provider cpu"
            )
        if writing is not None:
            writing.replace(cached)  # complete only once onnxruntime has written it all
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditions: np.ndarray) -> np.ndarray:
        return self.session.run(None, graph_feed(self.input_names, sample, timestep, conditions))[0]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output for inputs by name: for graphs other than a denoiser (text encoder, VAE decoder)."""
        return self.session.run(None, feeds)
