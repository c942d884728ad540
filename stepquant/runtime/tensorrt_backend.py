"""Runs a bundle's TensorRT engine through Polygraphy's TrtRunner, behind the same backend contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stepquant.export.tensorrt import tensorrt_version


class TensorRTBackend:
    def __init__(self, engine_path: str | Path) -> None:
        tensorrt_version()  # a clear error where TensorRT is missing
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
        self.runner.activate()

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        feed = {"sample": np.ascontiguousarray(sample.cpu().numpy(), dtype=np.float32),
                "timestep": np.ascontiguousarray(timestep.cpu().numpy(), dtype=np.float32)}
        output = self.runner.infer(feed)["eps"]
        return torch.as_tensor(np.asarray(output) if not isinstance(output, torch.Tensor) else output.cpu())

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None and runner.is_active:
            runner.deactivate()
