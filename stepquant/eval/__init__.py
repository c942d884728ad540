"""Quality measurement: paired metrics against FP samples and image grids for looking at them."""

from stepquant.eval.images import save_comparison_grid, save_grid
from stepquant.eval.metrics import PSNR_CAP_DB, psnr

__all__ = ["PSNR_CAP_DB", "psnr", "save_comparison_grid", "save_grid"]
