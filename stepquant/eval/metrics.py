"""Paired metrics between quantized and FP samples generated from the same noise."""

from __future__ import annotations

import torch

PSNR_CAP_DB = 100.0  # identical samples would be infinite; a cap keeps means finite and comparable


def psnr(samples: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample PSNR in dB of `samples` against `reference` (both [N,...] in [-1, 1]), capped."""
    if samples.shape != reference.shape:
        raise ValueError(f"shape mismatch: {tuple(samples.shape)} against {tuple(reference.shape)}")
    mse = (samples.double() - reference.double()).square().flatten(1).mean(dim=1)
    value = 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-30))
    return value.clamp(max=PSNR_CAP_DB).float()
