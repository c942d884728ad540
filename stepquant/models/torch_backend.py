"""Runs an `EpsilonModel` (FP or fake-quant) in torch eager mode behind the runtime's numpy backend contract,
so calibration, correction estimates and evaluation drive torch with the very loop the device runs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TorchBackend:
    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditions: np.ndarray) -> np.ndarray:
        names = getattr(self.model, "condition_names", ())
        with torch.inference_mode():
            out = self.model(
                torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(timestep, dtype=np.float32)),
                *(torch.from_numpy(np.ascontiguousarray(conditions[name], dtype=np.float32)) for name in names),
            )
        return out.numpy()
