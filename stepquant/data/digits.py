"""scikit-learn's 8x8 digits, upsampled to the demo model's 16x16 grey images in [-1, 1].

The demo model, its training script and the evaluation classifier all use this one preprocessing,
so features computed on generated samples and on real digits are comparable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16


def load_digits_16() -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images N x 1 x 16 x 16 in [-1, 1], labels N) for all 1,797 digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # scikit-learn is a training/evaluation extra, not a runtime need
        raise RuntimeError("the digits data needs scikit-learn: pip install 'stepquant[train]'") from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0) * 2.0 - 1.0, torch.tensor(digits.target, dtype=torch.long)


def held_out_split(count: int, fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): a fixed random split shared by training and its tests."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    cut = int(count * fraction)
    return order[cut:], order[:cut]
