"""Paired metrics between quantized and FP samples generated from the same noise."""

from __future__ import annotations

import numpy as np
import torch

PSNR_CAP_DB = 100.0  # identical samples would be infinite; a cap keeps means finite and comparable


def psnr(samples, reference, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample PSNR in dB of `samples` against `reference` (both [N,...] in [-1, 1]; numpy or torch), capped."""
    samples, reference = torch.as_tensor(samples), torch.as_tensor(reference)
    if samples.shape != reference.shape:
        raise ValueError(f"shape mismatch: {tuple(samples.shape)} against {tuple(reference.shape)}")
    mse = (samples.double() - reference.double()).square().flatten(1).mean(dim=1)
    value = 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-30))
    return value.clamp(max=PSNR_CAP_DB).float()


def frechet_distance(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (the FID formula)."""
    a, b = features.double().numpy(), reference.double().numpy()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("Fréchet distance of non-finite features: the samples they come from hold NaN or inf")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr(sqrt(A B)) = sum of sqrt of the eigenvalues of sqrt(A) B sqrt(A), which is symmetric PSD
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    product = root_a @ cov_b @ root_a
    cross = np.linalg.eigvalsh((product + product.T) / 2).clip(min=0)  # symmetric up to rounding; made exact
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.sqrt(cross).sum()
    return float(max(distance, 0.0))


def rms(a, b) -> torch.Tensor:
    """Per-sample root-mean-square difference of two batches (numpy or torch)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return (a.double() - b.double()).square().flatten(1).mean(dim=1).sqrt()
