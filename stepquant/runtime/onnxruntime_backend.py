"""Runs an exported graph (FP or Q/DQ) with onnxruntime, by default on its CPU provider."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

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
    ) -> None:
        if optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(f"unknown graph optimisation level {optimization_level!r}; choose from {', '.join(OPTIMIZATION_LEVELS)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization_level]
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        feed = {
            self.input_names[0]: np.ascontiguousarray(sample.detach().cpu().numpy(), dtype=np.float32),
            self.input_names[1]: np.ascontiguousarray(timestep.detach().cpu().numpy(), dtype=np.float32),
        }
        return torch.from_numpy(self.session.run(None, feed)[0])
