"""The one signature every backend and every exported graph share:
eps = model(sample, timestep, *conditions), conditions in `condition_names` order (none for an
unconditional UNet; text embeddings and the like for Stable Diffusion-style UNets and DiTs). Callers hand
it float32 tensors wherever they keep them; it runs on its own device and float type, and answers in
float32 on the caller's device."""

from __future__ import annotations

import torch
from torch import nn

from stepquant.models.denoisers import architecture_of
from stepquant.models.device import missing_kernel, module_placement


class EpsilonModel(nn.Module):
    """Wraps a diffusers denoiser so it takes (sample [B,C,H,W], timestep [B] float32, *conditions) and
    returns the noise estimate as a plain tensor, which is what ONNX export and the runtime backends need."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.unet = denoiser  # the attribute name keeps quantizer names (unet.down_blocks...) stable
        self._architecture = architecture_of(denoiser)
        self.conditions = self._architecture.conditions(dict(denoiser.config))
        self.condition_names = tuple(c.name for c in self.conditions)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        if len(conditions) != len(self.condition_names):
            raise TypeError(
                f"{type(self.unet).__name__} takes {len(self.condition_names)} condition inputs "
                f"({', '.join(self.condition_names) or 'none'}), got {len(conditions)}"
            )
        device, dtype = module_placement(self.unet)
        home = sample.device
        if home != device or sample.dtype != dtype:  # a no-op (nothing traced) for CPU float32 models
            sample, conditions = sample.to(device, dtype), tuple(c.to(device, dtype) for c in conditions)
            timestep = timestep.to(device)
        try:
            eps = self._architecture.call(self.unet, sample, timestep, dict(zip(self.condition_names, conditions)))
        except RuntimeError as err:
            raise missing_kernel(err, dtype, device) or err
        return eps if eps.device == home and eps.dtype == torch.float32 else eps.to(home, torch.float32)
