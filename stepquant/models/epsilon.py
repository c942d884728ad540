"""The one signature every backend and every exported graph share: eps = model(sample, timestep)."""

from __future__ import annotations

import torch
from torch import nn


class EpsilonModel(nn.Module):
    """Wraps a diffusers denoiser so it takes (sample [B,C,H,W], timestep [B] float32) and returns
    the noise estimate as a plain tensor, which is what ONNX export and the runtime backends need."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, return_dict=False)[0]
