"""Quality and speed measurement: paired metrics against FP samples from the same noise, Fréchet
distance in the project's digit-classifier features, error per step, latency, and image grids.

Names are imported on first use: `stepquant sample` writes grids (numpy and Pillow) without torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Evaluation": "evaluate",
    "evaluate": "evaluate",
    "plot_errors": "plots",
    "save_comparison_grid": "images",
    "save_grid": "images",
    "Latency": "latency",
    "measure_latency": "latency",
    "PSNR_CAP_DB": "metrics",
    "frechet_distance": "metrics",
    "psnr": "metrics",
    "rms": "metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stepquant.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"stepquant.eval.{_EXPORTS[name]}"), name)
