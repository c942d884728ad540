"""Reconstruction calibrators: learned rounding, the skip-concat split, the multi-step gradient, the
mixed-order target, timestep groups, and parity of the exported graphs with the reconstructed model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import FEW_STEPS, TINY_UNET
from diffusers import UNet2DModel

from stepquant.bundle import load_bundle
from stepquant.calibrators import collect_calibration_set
from stepquant.calibrators.mixed_order import midpoint_timestep, second_order_targets
from stepquant.calibrators.multistep import multistep_objective
from stepquant.calibrators.ranges import calibrate_ranges
from stepquant.calibrators.reconstruction import ReconstructionConfig, reconstruct_blocks, reconstruction_units
from stepquant.calibrators.timestep_groups import split_by_range_change, split_every
from stepquant.export.config import CalibrationConfig, ChecksConfig
from stepquant.export.parity import replay_parity
from stepquant.models.demo_config import SCHEDULER_CONFIG
from stepquant.models.epsilon import EpsilonModel
from stepquant.models.schedulers import capture_table, make_scheduler
from stepquant.models.torch_backend import TorchBackend
from stepquant.pipeline import ExportConfig, export_quantized
from stepquant.quant import QuantSpec, quantize_
from stepquant.quant.layers import ActivationQuantizer, QuantizedLayer, SplitQuantizedLayer, WeightQuantizer
from stepquant.quant.quantize import bake_rounding_, skip_concat_splits
from stepquant.runtime.bundle_backends import quantized_backend
from stepquant.runtime.timestep_groups import TimestepGroupBackend

FAST = ReconstructionConfig(iters=30, batch_size=8, trajectory_iters=4, trajectory_batch=4)


@pytest.fixture(scope="module")
def tiny():
    """(FP model, calibration set) for the tiny random UNet, 4 DDIM steps."""
    torch.manual_seed(0)
    fp = EpsilonModel(UNet2DModel(**TINY_UNET)).eval()
    calib = collect_calibration_set(
        TorchBackend(fp), SCHEDULER_CONFIG, range(8), (1, 8, 8), FEW_STEPS, 4, progress=False
    )
    return fp, calib


def _quantized(fp, spec=QuantSpec(4, 8)):
    q = copy.deepcopy(fp)
    quantize_(q, spec)
    return q


@pytest.mark.slow
def test_learned_rounding_stays_within_one_grid_step_of_nearest_and_moves_some_weights(tiny):
    fp, calib = tiny
    q = _quantized(fp)
    nearest = {n: m.qweight.clone() for n, m in q.named_modules() if isinstance(m, WeightQuantizer)}
    calibrate_ranges(q, calib, progress=False)
    reconstruct_blocks(fp, q, calib, FAST, progress=False)
    bake_rounding_(q)
    changed = 0
    for name, module in q.named_modules():
        if isinstance(module, WeightQuantizer):
            assert module.rounding is None  # baked: the exported integers are the learned ones
            step = (module.qweight.int() - nearest[name].int()).abs()
            assert int(step.max()) <= 1
            changed += int((step > 0).sum())
    assert changed > 0


@pytest.mark.slow
def test_reconstruction_lowers_the_block_output_error(tiny):
    fp, calib = tiny
    q = _quantized(fp)
    calibrate_ranges(q, calib, progress=False)
    before = (q(calib.samples, calib.timesteps) - fp(calib.samples, calib.timesteps)).pow(2).mean()
    reconstruct_blocks(fp, q, calib, ReconstructionConfig(iters=60, batch_size=8), progress=False)
    bake_rounding_(q)
    after = (q(calib.samples, calib.timesteps) - fp(calib.samples, calib.timesteps)).pow(2).mean()
    assert after < before


def test_units_follow_execution_order(tiny):
    fp, calib = tiny
    q = _quantized(fp)
    calibrate_ranges(q, calib, progress=False)
    units = reconstruction_units(q, calib)
    assert units.index("unet.mid_block.resnets.0") < units.index("unet.up_blocks.0.resnets.0")
    assert units[0].startswith("unet.down_blocks.0")


def test_split_layers_consume_h_and_skip_separately_and_match_the_unsplit_layer():
    torch.manual_seed(0)
    model = EpsilonModel(UNet2DModel(**TINY_UNET)).eval()
    splits = skip_concat_splits(model)
    # first decoder block: h from the mid block (32 channels), skip from the encoder
    assert splits["unet.up_blocks.0.resnets.0.conv1"] == 32
    assert splits["unet.up_blocks.1.resnets.0.conv1"] == 32
    quantized = copy.deepcopy(model)
    quantize_(quantized, QuantSpec(split_skip_concat=True))
    layer = quantized.get_submodule("unet.up_blocks.0.resnets.0.conv1")
    assert isinstance(layer, SplitQuantizedLayer)
    for module in layer.modules():
        if isinstance(module, QuantizedLayer):
            module.set_enabled(False)
    x = torch.randn(2, layer.parts[0].layer.in_channels + layer.parts[1].layer.in_channels, 4, 4)
    original = model.get_submodule("unet.up_blocks.0.resnets.0.conv1")
    torch.testing.assert_close(layer(x), original(x), rtol=1e-5, atol=1e-5)


def test_multistep_gradient_equals_the_unrolled_chain_without_keeping_it(tiny):
    fp, calib = tiny
    q = _quantized(fp)
    calibrate_ranges(q, calib, progress=False)
    quantizers = [m for m in q.modules() if isinstance(m, ActivationQuantizer)]
    for m in quantizers:
        m.scale = m.scale.detach().clone().requires_grad_(True)
    table = capture_table(FEW_STEPS, SCHEDULER_CONFIG)
    grads = []
    for unrolled in (True, False):
        for m in quantizers:
            m.scale.grad = None
        objective = multistep_objective(fp, q, calib, table, 3, 4, torch.Generator().manual_seed(1), unrolled)
        objective(0)
        grads.append(torch.stack([m.scale.grad for m in quantizers]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_mixed_order_target_is_the_fp_estimate_at_the_log_snr_midpoint(tiny):
    fp, calib = tiny
    scheduler = make_scheduler(FEW_STEPS, SCHEDULER_CONFIG)
    t, prev = int(scheduler.timesteps[0]), int(scheduler.timesteps[1])
    r = midpoint_timestep(scheduler, t, prev)
    assert prev < r < t
    targets = torch.cat(list(second_order_targets(fp, calib.sampler_states(), scheduler)))
    first_order = fp(calib.samples, calib.timesteps).detach()
    last = calib.timesteps == float(scheduler.timesteps[-1])
    torch.testing.assert_close(targets[last], first_order[last])  # no next step: first-order target
    assert not torch.allclose(targets[~last], first_order[~last])


def test_segmentation_puts_the_boundary_where_ranges_jump():
    profile = torch.tensor([[1.0, 2.0], [1.1, 2.0], [1.0, 2.1], [8.0, 0.5], [8.2, 0.5]])
    assert split_by_range_change(profile, 2) == [range(0, 3), range(3, 5)]
    assert split_every(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(ValueError, match="cannot make 6 timestep groups"):
        split_by_range_change(profile, 6)


def test_group_backend_sends_each_timestep_to_its_graph():
    calls = []

    def backend(tag):
        def run(sample, timestep):
            calls.append((tag, timestep.tolist()))
            return np.full_like(sample, tag)

        return run

    grouped = TimestepGroupBackend([backend(0), backend(1)], [[750.0, 500.0], [250.0, 0.0]])
    out = grouped(np.zeros((3, 1, 2, 2), dtype=np.float32), np.array([750.0, 0.0, 500.0], dtype=np.float32))
    assert out[:, 0, 0, 0].tolist() == [0.0, 1.0, 0.0]
    assert sorted(calls) == [(0, [750.0, 500.0]), (1, [0.0])]
    with pytest.raises(ValueError, match="timestep 125 belongs to no timestep group"):
        grouped(np.zeros((1, 1, 2, 2), dtype=np.float32), np.array([125.0], dtype=np.float32))


@pytest.mark.parametrize("calibrator", ["reconstruct", "multistep", "mixed-order"])
def test_exported_graph_reproduces_the_reconstructed_model(tiny_model_dir, tmp_path, calibrator):
    report = export_quantized(
        ExportConfig(
            model=str(tiny_model_dir),
            out=tmp_path / calibrator,
            quant=QuantSpec(8, 8, split_skip_concat=True),
            sampler=FEW_STEPS,
            progress=False,
            calibration=CalibrationConfig(calibrator=calibrator, reconstruction=FAST, samples=4),
            checks=ChecksConfig(eval_samples=2),
        )
    )
    assert report.parity_passed, report.primary.layerwise[0].summary()
    manifest = json.loads((tmp_path / calibrator / "manifest.json").read_text())
    assert manifest["calibration"]["calibrator"] == calibrator
    assert manifest["calibration"]["blocks"] > 0


def test_timestep_groups_export_one_graph_per_group_and_the_runtime_switches(tiny_model_dir, tmp_path):
    out = tmp_path / "groups"
    report = export_quantized(
        ExportConfig(
            model=str(tiny_model_dir),
            out=out,
            sampler=FEW_STEPS,
            progress=False,
            calibration=CalibrationConfig(calibrator="minmax", timestep_groups=2, samples=4),
            checks=ChecksConfig(eval_samples=2),
        )
    )
    bundle = load_bundle(out)
    groups = bundle.target("tensorrt").timestep_groups
    assert [g.graph for g in groups] == report.graphs == ["model_g0.onnx", "model_g1.onnx"]
    covered = sorted(t for g in groups for t in g.timesteps)
    assert covered == sorted(float(t) for t in make_scheduler(FEW_STEPS, SCHEDULER_CONFIG).timesteps)
    assert replay_parity(bundle).passed
    backend = quantized_backend(bundle)
    assert isinstance(backend, TimestepGroupBackend)
    # each step runs its own group's graph: the graphs differ, and each matches the group's reference
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)
    for g, group in enumerate(groups):
        t = np.full((2,), group.timesteps[0], dtype=np.float32)
        np.testing.assert_array_equal(backend(x, t), backend.backends[g](x, t))
    t0, t1 = (np.full((2,), g.timesteps[0], dtype=np.float32) for g in groups)
    assert not np.allclose(backend.backends[0](x, t0), backend.backends[1](x, t0))
    assert "model_g1.plan" in (out / "build_engine.sh").read_text()
