"""Runs a bundle's TensorRT engine through Polygraphy's TrtRunner, behind the same backend contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stepquant.export.tensorrt import tensorrt_version
from stepquant.runtime.backend import graph_feed


class TensorRTBackend:
    def __init__(self, engine_path: str | Path) -> None:
        tensorrt_version()  # a clear error where TensorRT is missing
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
        self.runner.activate()
        self.input_names = list(self.runner.get_input_metadata().keys())

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        output = self.runner.infer(graph_feed(self.input_names, sample, timestep, conditions))["eps"]
        return torch.as_tensor(np.asarray(output) if not isinstance(output, torch.Tensor) else output.cpu())

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None and runner.is_active:
            runner.deactivate()
