"""Write sample grids as PNG (samples in [-1, 1], grey or RGB)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def _grid_array(samples, columns: int, pad: int = 1) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float32)  # numpy arrays, or torch tensors on the CPU
    if samples.shape[1] not in (1, 3):  # latents: their first three channels (or the first one) as a picture
        samples = samples[:, :3] if samples.shape[1] > 3 else samples[:, :1]
    n, c, h, w = samples.shape
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    pixels = ((samples.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    for i in range(n):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        canvas[top : top + h, left : left + w] = pixels[i]
    return canvas


def _save(array: np.ndarray, path: Path, upscale: int) -> None:
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image.resize((image.width * upscale, image.height * upscale), Image.NEAREST).save(path)


def save_grid(samples, path: Path, columns: int = 8, upscale: int = 4) -> None:
    _save(_grid_array(samples, columns), Path(path), upscale)


def save_comparison_grid(left, right, path: Path, columns: int = 8, upscale: int = 4) -> None:
    """Two grids side by side (e.g. FP | quantized), the same seed at the same place in each."""
    a, b = _grid_array(left, columns), _grid_array(right, columns)
    gap = np.full((a.shape[0], 6, a.shape[2]), 160, dtype=np.uint8)
    _save(np.concatenate([a, gap, b], axis=1), Path(path), upscale)
