"""Runs an `EpsilonModel` (FP or fake-quant) in torch eager mode."""

from __future__ import annotations

import torch
from torch import nn


class TorchBackend:
    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        names = getattr(self.model, "condition_names", ())
        with torch.inference_mode():
            return self.model(sample, timestep, *(conditions[name] for name in names))
