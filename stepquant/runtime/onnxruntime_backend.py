"""Runs an exported graph (FP or Q/DQ) with onnxruntime, by default on its CPU provider.

Session settings that matter for CPU speed are arguments: intra-op threads, the graph optimisation
level, and a cache directory for the optimised graph. Optimising a quantized graph (QDQ fusion into
integer kernels, layout transforms) takes a noticeable part of start-up; with `cache_dir` the first
session writes the optimised graph there, keyed by the model's sha256 and the level, and later sessions
load it with optimisations off. At level "all" the cached graph holds kernels chosen for this CPU, so a
cache belongs to one machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from stepquant.runtime.backend import graph_feed

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OnnxRuntimeBackend:
    def __init__(
        self,
        model_path: str | Path,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        optimization_level: str = "all",
        cache_dir: str | Path | None = None,
    ) -> None:
        if optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(f"unknown graph optimisation level {optimization_level!r}; choose from {', '.join(OPTIMIZATION_LEVELS)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization_level]
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
                options.graph_optimization_level = OPTIMIZATION_LEVELS["disable"]
            else:
                cached.parent.mkdir(parents=True, exist_ok=True)
                writing = cached.with_suffix(".partial")
                options.optimized_model_filepath = str(writing)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as err:  # onnxruntime's own errors (its exception types are not exported)
            raise ValueError(f"onnxruntime cannot load {path}: {' '.join(str(err).split())[:300]}") from err
        if writing is not None:
            writing.replace(cached)  # complete only once onnxruntime has written it all
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditions: np.ndarray) -> np.ndarray:
        return self.session.run(None, graph_feed(self.input_names, sample, timestep, conditions))[0]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output for inputs by name: for graphs other than a denoiser (text encoder, VAE decoder)."""
        return self.session.run(None, feeds)
