"""Quality and speed measurement: paired metrics against FP samples from the same noise, Fréchet
distance in the project's digit-classifier features, error per step, latency, and image grids."""

from stepquant.eval.evaluate import Evaluation, evaluate, plot_errors
from stepquant.eval.images import save_comparison_grid, save_grid
from stepquant.eval.latency import Latency, measure_latency
from stepquant.eval.metrics import PSNR_CAP_DB, frechet_distance, psnr, rms

__all__ = [
    "PSNR_CAP_DB",
    "Evaluation",
    "Latency",
    "evaluate",
    "frechet_distance",
    "measure_latency",
    "plot_errors",
    "psnr",
    "rms",
    "save_comparison_grid",
    "save_grid",
]
