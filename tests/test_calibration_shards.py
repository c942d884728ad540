"""Calibration inputs kept on disk, one file per recorded call: the set read back from its shards is the set
kept in memory (batches, any subset in any order, the guided sampler states), memory holds only the
timesteps, reconstruction keeping its block inputs beside them learns exactly what it learns in memory, and a
disk that fills while sharding ends the export in one line with nothing left behind."""

from __future__ import annotations

import copy
import errno
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from stepquant.calibrators import collect_calibration_set, reconstruction, shards
from stepquant.calibrators.calibrate import calibrate_
from stepquant.calibrators.reconstruction import ReconstructionConfig
from stepquant.models import EpsilonModel, load_model
from stepquant.models.tiny import random_conditioning, save_tiny_pipeline
from stepquant.models.torch_backend import TorchBackend
from stepquant.quant import QuantSpec, quantize_
from stepquant.runtime import SamplerConfig

GUIDED = SamplerConfig(steps=3, guidance_scale=2.0)


@pytest.fixture(scope="module")
def guided_sets(tmp_path_factory):
    """The same guided calibration of a tiny SDXL-style model (three condition inputs) in memory and on disk."""
    root = tmp_path_factory.mktemp("shards")
    loaded = load_model(str(save_tiny_pipeline("sdxl", root / "model")))
    model = EpsilonModel(loaded.denoiser)
    conditioning = random_conditioning(model, prompts=3)
    args = (TorchBackend(model), loaded.scheduler_config, range(5), (4, 8, 8), GUIDED, 3)
    memory = collect_calibration_set(*args, progress=False, conditioning=conditioning, batch_size=2)
    disk = collect_calibration_set(
        *args, progress=False, conditioning=conditioning, batch_size=2, shard_dir=root / "calls"
    )
    return memory, disk, loaded


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_set_on_disk_reads_back_as_the_set_in_memory(guided_sets):
    memory, disk, _ = guided_sets
    assert disk.samples is None and len(disk) == len(memory) == 5 * 3 * 2
    assert disk.segments == memory.segments == [4, 4, 4, 4, 4, 4, 2, 2, 2]  # 2 seeds x 2 halves per call, then 1 seed
    assert len(list(disk.store.directory.iterdir())) == len(disk.segments)
    for a, b in zip(disk.batches(3), memory.batches(3), strict=True):
        assert _equal(a, b)
    index = torch.randperm(len(memory), generator=torch.Generator().manual_seed(0))[:11]
    assert _equal(disk.subset(index).inputs(), memory.subset(index).inputs())
    assert _equal(
        disk.at_timestep(memory.unique_timesteps()[1], 3).inputs(),
        memory.at_timestep(memory.unique_timesteps()[1], 3).inputs(),
    )
    a, b = disk.sampler_states(), memory.sampler_states()
    a, b = a.batch(torch.arange(len(b))), b.batch(torch.arange(len(b)))
    assert torch.equal(a.samples, b.samples) and a.guidance_scale == b.guidance_scale == 2.0
    assert all(
        torch.equal(a.unconditional[k], b.unconditional[k]) and torch.equal(a.conditions[k], b.conditions[k])
        for k in b.conditions
    )
    assert list(disk.subset(index).conditions) == list(memory.conditions)  # the model's input order


def test_rows_come_back_in_the_order_asked_for_from_any_files(tmp_path):
    store = shards.RowShards(tmp_path / "rows")
    whole = {
        "x": torch.randn(13, 3, 2),
        "t": torch.arange(13.0),
        "h": torch.randn(13, 4).to(torch.bfloat16),
        "i": torch.arange(13),
        "b": torch.arange(13) % 3 == 0,
    }
    for start, stop in ((0, 5), (5, 6), (6, 13)):  # files of 5, 1 and 7 rows
        store.append({name: value[start:stop] for name, value in whole.items()})
    index = torch.tensor([12, 0, 5, 5, 4, 6, 7, 8, 1, 12])  # repeats, runs, every file, out of order
    rows = store.rows(index)
    assert all(torch.equal(rows[name], whole[name][index]) for name in whole)
    empty = store.rows(torch.tensor([], dtype=torch.long))
    assert sorted(empty) == sorted(whole) and all(empty[name].shape == (0, *whole[name].shape[1:]) for name in whole)
    assert all(torch.equal(store.load(2)[name], whole[name][6:13]) for name in whole)
    store.remove()
    assert not (tmp_path / "rows").exists()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_reading_rows_maps_no_file_into_memory(tmp_path):
    """A memory map's touched pages count in RSS until it closes: reconstruction's random batches brought every
    block input into RSS that way, growing peak memory with the sample count. Reads must not map the shards."""
    store = shards.RowShards(tmp_path / "rows")
    for _ in range(3):
        store.append({"x": torch.randn(64, 256)})
    store.rows(torch.randperm(192))
    store.load(1)
    assert str(tmp_path / "rows") not in Path("/proc/self/maps").read_text()


def test_a_truncated_shard_is_one_line(tmp_path):
    store = shards.RowShards(tmp_path / "rows")
    store.append({"x": torch.randn(8, 16)})
    path = next((tmp_path / "rows").iterdir())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(shards.ShardError, match="truncated"):
        store.rows(torch.tensor([7]))
    path.write_bytes(b"\xff" * 8)
    with pytest.raises(shards.ShardError, match="cannot read calibration shard"):
        shards.RowShards(tmp_path / "rows").load(0)


@pytest.mark.parametrize("calibrator", ["reconstruct", "multistep", "mixed-order"])
def test_learning_from_the_set_on_disk_learns_what_it_learns_in_memory(guided_sets, monkeypatch, calibrator):
    """Same random batches, same rows, bit for bit; each block's files are removed once it is learned, the
    blocks' inputs (and mixed-order's targets) are really read from disk (the in-memory path is not taken),
    and the trajectory calibrators read the sampler states a batch at a time, never the whole set at once."""
    memory, disk, loaded = guided_sets
    learned = {}
    written = []
    largest_read = []
    rows = disk.store.rows
    monkeypatch.setattr(disk.store, "rows", lambda index: (largest_read.append(len(index)), rows(index))[1])
    save = shards.save_file
    monkeypatch.setattr(shards, "save_file", lambda tensors, path: (written.append(path), save(tensors, path))[1])
    units = reconstruction.reconstruction_units
    # three blocks keep it fast: the first, and a transformer block (keyword arguments: the text states)
    monkeypatch.setattr(
        reconstruction,
        "reconstruction_units",
        lambda model, data: (lambda found: found[:1] + [u for u in found if u.endswith("transformer_blocks.0")][:2])(
            units(model, data)
        ),
    )
    for name, data in (("memory", memory), ("disk", disk)):
        fp = EpsilonModel(loaded.denoiser)
        q = EpsilonModel(copy.deepcopy(loaded.denoiser))
        quantize_(q, QuantSpec(4, 8))
        calibrate_(
            fp,
            q,
            data,
            calibrator,
            loaded.scheduler_config,
            GUIDED,
            progress=False,
            reconstruction=ReconstructionConfig(iters=4, batch_size=8, trajectory_iters=3, trajectory_batch=4),
        )
        learned[name] = q.state_dict()
    assert any("/blocks/inputs/" in path for path in written) and any("/blocks/targets/" in path for path in written)
    folders = {path.rsplit("/", 1)[0] for path in written}
    assert len(folders) == 2 + (calibrator == "mixed-order") and len(written) > 6  # 3 blocks, several batches
    assert (calibrator == "mixed-order") == any("/targets-" in folder for folder in folders)
    assert max(largest_read, default=0) < len(disk)  # the whole set is never read at once
    assert not (disk.store.directory / "blocks").exists()
    assert learned["memory"].keys() == learned["disk"].keys()
    assert all(torch.equal(learned["memory"][k], learned["disk"][k]) for k in learned["memory"]), [
        k for k in learned["memory"] if not torch.equal(learned["memory"][k], learned["disk"][k])
    ][:5]


def test_a_full_disk_while_sharding_is_one_line_and_leaves_nothing(monkeypatch, tiny_model_dir, tmp_path):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "save_file", full)
    result = run_cli(
        "export-quantized",
        "--model",
        tiny_model_dir,
        "--out",
        tmp_path / "b",
        "--steps",
        2,
        "--calib-samples",
        2,
        "--no-progress",
    )
    assert_one_line_error(result, "cannot write calibration inputs to")
    assert "the disk is full" in result.stderr
    assert not list(tmp_path.iterdir())
