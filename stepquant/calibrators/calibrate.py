"""`calibrate_(fp_model, q_model, data, calibrator)`: the one entry point behind `--calibrator`.

Every calibrator starts from range calibration; the reconstruction ones then learn rounding and step
sizes block by block, and the trajectory ones finish with a network-level stage whose loss follows
the sampler (several steps at once, or the FP second-order direction). Learned roundings are baked
into the integer weights at the end, so the exported graph carries exactly what was learned.
"""

from __future__ import annotations

import torch
from torch import nn

from stepquant.calibrators import distributed
from stepquant.calibrators.data import CalibrationSet
from stepquant.calibrators.mixed_order import mixed_order_objective
from stepquant.calibrators.multistep import multistep_objective
from stepquant.calibrators.ranges import calibrate_ranges
from stepquant.calibrators.reconstruction import ReconstructionConfig, reconstruct_blocks, train_quantizers
from stepquant.models.schedulers import capture_table, make_scheduler
from stepquant.quant.quantize import bake_rounding_
from stepquant.runtime.sampler import SamplerConfig

OBSERVER_CALIBRATORS = {"minmax": "max", "percentile": "percentile", "mse": "mse"}
TRAJECTORY_CALIBRATORS = ("multistep", "mixed-order")
RECONSTRUCTION_CALIBRATORS = ("reconstruct", *TRAJECTORY_CALIBRATORS)
CALIBRATORS = (*OBSERVER_CALIBRATORS, *RECONSTRUCTION_CALIBRATORS)


def calibrate_(
    fp_model: nn.Module,
    q_model: nn.Module,
    data: CalibrationSet,
    calibrator: str = "minmax",
    scheduler_config: dict | None = None,
    sampler: SamplerConfig = SamplerConfig(),
    percentile: float = 99.99,
    reconstruction: ReconstructionConfig = ReconstructionConfig(),
    progress: bool = True,
) -> dict:
    """Calibrate the fake-quant `q_model` in place against `fp_model`; return a summary for the manifest."""
    if calibrator not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {calibrator!r}; choose from {', '.join(CALIBRATORS)}")
    calibrate_ranges(q_model, data, OBSERVER_CALIBRATORS.get(calibrator, "max"), percentile, progress=progress)
    summary: dict = {"calibrator": calibrator}
    if calibrator in OBSERVER_CALIBRATORS:
        return summary
    if scheduler_config is None and calibrator != "reconstruct":
        raise ValueError(f"the {calibrator} calibrator needs the model's noise schedule (scheduler_config)")
    block_losses = reconstruct_blocks(fp_model, q_model, data, reconstruction, progress)
    summary["blocks"] = len(block_losses)
    if calibrator != "reconstruct":
        # the trajectory stage follows the deterministic DDIM steps the calibration states came from
        ddim = SamplerConfig("ddim", sampler.steps, 0.0)
        generator = torch.Generator().manual_seed(reconstruction.seed + distributed.rank())
        if calibrator == "multistep":
            objective = multistep_objective(fp_model, q_model, data, capture_table(ddim, scheduler_config), reconstruction.multistep_steps,
                                            reconstruction.trajectory_batch, generator, reconstruction.unrolled)
        else:
            objective = mixed_order_objective(fp_model, q_model, data, make_scheduler(ddim, scheduler_config),
                                              reconstruction.trajectory_batch, generator)
        summary["trajectory_loss"] = train_quantizers(q_model, objective, reconstruction, reconstruction.trajectory_iters,
                                                      beta_start=reconstruction.beta_end, desc=calibrator, progress=progress,
                                                      lr_factor=reconstruction.trajectory_lr, learn_rounding=False)
    bake_rounding_(q_model)
    return summary
