"""Calibration inputs kept on disk, one file per recorded call: the set read back from its shards is the set
kept in memory (batches, any subset in any order, the guided sampler states), memory holds only the
timesteps, and a disk that fills while sharding ends the export in one line with nothing left behind."""

from __future__ import annotations

import errno

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from stepquant.calibrators import collect_calibration_set, shards
from stepquant.models import EpsilonModel, load_model
from stepquant.models.tiny import random_conditioning, save_tiny_pipeline
from stepquant.models.torch_backend import TorchBackend
from stepquant.runtime import SamplerConfig


@pytest.fixture(scope="module")
def guided_sets(tmp_path_factory):
    """The same guided calibration of a tiny SDXL-style model (three condition inputs) in memory and on disk."""
    root = tmp_path_factory.mktemp("shards")
    loaded = load_model(str(save_tiny_pipeline("sdxl", root / "model")))
    model = EpsilonModel(loaded.denoiser)
    conditioning = random_conditioning(model, prompts=3)
    args = (TorchBackend(model), loaded.scheduler_config, range(5), (4, 8, 8), SamplerConfig(steps=3, guidance_scale=2.0), 3)
    memory = collect_calibration_set(*args, progress=False, conditioning=conditioning, batch_size=2)
    disk = collect_calibration_set(*args, progress=False, conditioning=conditioning, batch_size=2, shard_dir=root / "calls")
    return memory, disk


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_set_on_disk_reads_back_as_the_set_in_memory(guided_sets):
    memory, disk = guided_sets
    assert disk.samples is None and len(disk) == len(memory) == 5 * 3 * 2
    assert disk.segments == memory.segments == [4, 4, 4, 4, 4, 4, 2, 2, 2]  # 2 seeds x 2 halves per call, then 1 seed
    assert len(list(disk.store.directory.iterdir())) == len(disk.segments)
    for a, b in zip(disk.batches(3), memory.batches(3), strict=True):
        assert _equal(a, b)
    index = torch.randperm(len(memory), generator=torch.Generator().manual_seed(0))[:11]
    assert _equal(disk.subset(index).inputs(), memory.subset(index).inputs())
    assert _equal(disk.at_timestep(memory.unique_timesteps()[1], 3).inputs(), memory.at_timestep(memory.unique_timesteps()[1], 3).inputs())
    a, b = disk.sampler_states(), memory.sampler_states()
    assert torch.equal(a.samples, b.samples) and a.guidance_scale == b.guidance_scale == 2.0
    assert all(torch.equal(a.unconditional[k], b.unconditional[k]) and torch.equal(a.conditions[k], b.conditions[k])
               for k in b.conditions)
    assert list(disk.subset(index).conditions) == list(memory.conditions)  # the model's input order


def test_a_full_disk_while_sharding_is_one_line_and_leaves_nothing(monkeypatch, tiny_model_dir, tmp_path):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "save_file", full)
    result = run_cli("export-quantized", "--model", tiny_model_dir, "--out", tmp_path / "b", "--steps", 2,
                     "--calib-samples", 2, "--no-progress")
    assert_one_line_error(result, "cannot write calibration inputs to")
    assert "the disk is full" in result.stderr
    assert not list(tmp_path.iterdir())
