"""`calibrate_(fp_model, q_model, data, calibrator)`: the one entry point behind `--calibrator`.

Every calibrator starts from range calibration; the reconstruction ones then learn rounding and step
sizes block by block, and the trajectory ones finish with a network-level stage whose loss follows
the sampler (several steps at once, or the FP second-order direction). Learned roundings are baked
into the integer weights at the end, so the exported graph carries exactly what was learned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Calibrator:
    """One `--calibrator`: the observer its ranges come from, whether blocks are reconstructed next, and the
    network-level objective trained last, built from (fp_model, q_model, data, the DDIM sampler the calibration
    states came from, the noise schedule, reconstruction settings, generator); None: no trajectory stage."""

    observer: str = "max"
    reconstructs: bool = False
    trajectory: Callable[..., Callable] | None = None


def _multistep(
    fp_model,
    q_model,
    data,
    ddim: SamplerConfig,
    scheduler_config: dict,
    settings: ReconstructionConfig,
    generator: torch.Generator,
):
    return multistep_objective(
        fp_model,
        q_model,
        data,
        capture_table(ddim, scheduler_config),
        settings.multistep_steps,
        settings.trajectory_batch,
        generator,
        settings.unrolled,
    )


def _mixed_order(
    fp_model,
    q_model,
    data,
    ddim: SamplerConfig,
    scheduler_config: dict,
    settings: ReconstructionConfig,
    generator: torch.Generator,
):
    return mixed_order_objective(
        fp_model, q_model, data, make_scheduler(ddim, scheduler_config), settings.trajectory_batch, generator
    )


CALIBRATORS: dict[str, Calibrator] = {
    "minmax": Calibrator("max"),
    "percentile": Calibrator("percentile"),
    "mse": Calibrator("mse"),
    "reconstruct": Calibrator(reconstructs=True),
    "multistep": Calibrator(reconstructs=True, trajectory=_multistep),
    "mixed-order": Calibrator(reconstructs=True, trajectory=_mixed_order),
}
TRAJECTORY_CALIBRATORS = tuple(name for name, c in CALIBRATORS.items() if c.trajectory is not None)
RECONSTRUCTION_CALIBRATORS = tuple(name for name, c in CALIBRATORS.items() if c.reconstructs)


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
    method = CALIBRATORS[calibrator]
    calibrate_ranges(q_model, data, method.observer, percentile, progress=progress)
    summary: dict = {"calibrator": calibrator}
    if not method.reconstructs:
        return summary
    if scheduler_config is None and method.trajectory is not None:
        raise ValueError(f"the {calibrator} calibrator needs the model's noise schedule (scheduler_config)")
    block_losses = reconstruct_blocks(fp_model, q_model, data, reconstruction, progress)
    summary["blocks"] = len(block_losses)
    if method.trajectory is not None:
        # the trajectory stage follows the deterministic DDIM steps the calibration states came from
        ddim = SamplerConfig("ddim", sampler.steps, 0.0)
        generator = torch.Generator().manual_seed(reconstruction.seed + distributed.rank())
        objective = method.trajectory(fp_model, q_model, data, ddim, scheduler_config, reconstruction, generator)
        summary["trajectory_loss"] = train_quantizers(
            q_model,
            objective,
            reconstruction,
            reconstruction.trajectory_iters,
            beta_start=reconstruction.beta_end,
            desc=calibrator,
            progress=progress,
            lr_factor=reconstruction.trajectory_lr,
            learn_rounding=False,
        )
    bake_rounding_(q_model)
    return summary
