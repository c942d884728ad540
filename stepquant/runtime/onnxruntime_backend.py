"""Runs an exported graph (FP or Q/DQ) with onnxruntime, by default on its CPU provider."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch


class OnnxRuntimeBackend:
    def __init__(
        self,
        model_path: str | Path,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        options = ort.SessionOptions()
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
