"""The host loop: per-sample seeding independent of batching, the scheduler table against diffusers' own
loop, deterministic and stochastic samplers, interchangeable backends."""

import dataclasses

import numpy as np
import pytest

from stepquant.export.onnx_export import export_onnx
from stepquant.models import EpsilonModel, load_model
from stepquant.models.schedulers import DiffusersNoise, capture_table, check_table, diffusers_samples
from stepquant.models.torch_backend import TorchBackend
from stepquant.runtime import OnnxRuntimeBackend, SamplerConfig, sample
from stepquant.runtime.scheduler_table import SchedulerTable, SchedulerTableError

SAMPLERS = [
    SamplerConfig("ddim", 4, 0.0),
    SamplerConfig("ddim", 4, 1.0),
    SamplerConfig("ddpm", 4),
    SamplerConfig("dpm-solver++", 4),
    SamplerConfig("euler-ancestral", 4),
    SamplerConfig("unipc", 4, karras_sigmas=True),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    return TorchBackend(EpsilonModel(loaded.denoiser)), loaded.scheduler_config


@pytest.mark.slow
@pytest.mark.parametrize("config", SAMPLERS)
def test_each_seed_gives_the_same_sample_whatever_the_batch(tiny, config):
    backend, schedule = tiny
    table = capture_table(config, schedule)
    together = sample(backend, table, [3, 4, 5], (1, 8, 8), config, batch_size=3, progress=False).samples
    alone = sample(backend, table, [4], (1, 8, 8), config, batch_size=1, progress=False).samples
    assert np.allclose(together[1], alone[0], atol=1e-5)
    assert not np.allclose(together[0], together[1])
    assert np.abs(together).max() <= 1.0


@pytest.fixture(scope="module")
def demo():
    loaded = load_model("demo-digits")
    return TorchBackend(EpsilonModel(loaded.denoiser)), loaded.scheduler_config


@pytest.mark.parametrize(
    "config",
    [
        SamplerConfig("ddim", 25, 0.0),
        SamplerConfig("ddim", 10, 1.0),
        SamplerConfig("ddpm", 25),
        SamplerConfig("dpm-solver++", 20),
        SamplerConfig("dpm-solver++", 15, karras_sigmas=True),
        SamplerConfig("euler", 20),
        SamplerConfig("euler", 20, karras_sigmas=True),
        SamplerConfig("euler-ancestral", 20),
        SamplerConfig("unipc", 20),
    ],
    ids=lambda c: c.describe(),
)
@pytest.mark.slow
def test_the_runtime_loop_equals_diffusers_own_loop_from_the_same_noise(demo, config):
    """On the trained demo: a random network amplifies float32 rounding (the table's coefficients are
    products diffusers takes in another order) by about 30x over 10 steps; a trained one does not. Euler-type
    samplers carry the sample at sigma scale (up to about 15 here), where float32 rounds 15x coarser."""
    backend, schedule = demo
    seeds, shape = [0, 1, 2, 3], (1, 16, 16)
    table = capture_table(config, schedule)
    ours = sample(
        backend,
        table,
        seeds,
        shape,
        config,
        progress=False,
        clip=False,
        noise_streams=lambda s: [DiffusersNoise(seed) for seed in s],
    ).samples
    assert np.abs(ours - diffusers_samples(backend, config, schedule, seeds, shape)).max() <= 1e-5 * max(
        1.0, table.init_noise_sigma
    )


def test_a_table_that_departs_from_its_scheduler_is_refused(tiny):
    _, schedule = tiny
    for config in SAMPLERS:
        table = capture_table(config, schedule)
        check_table(table, config, schedule)  # the captured table passes
        for row in ("from_x0", "x0_from_output", "noise_std", "from_sample"):
            values = getattr(table, row).copy()
            largest = np.abs(values).reshape(len(values), -1).max(axis=1)
            if largest.max() < 1e-6:  # a row this sampler does not use (0 up to rounding)
                continue
            values[np.argmax(largest)] *= 1.01  # a 1% fault in the step that leans on the row most
            with pytest.raises(SchedulerTableError, match="departs from diffusers"):
                check_table(dataclasses.replace(table, **{row: values}), config, schedule)


def test_tables_round_trip_and_refuse_other_samplers_and_malformed_data(tiny):
    _, schedule = tiny
    table = capture_table(SamplerConfig("ddim", 4, 0.5), schedule)
    again = SchedulerTable.from_dict(table.to_dict())
    assert all(
        np.array_equal(getattr(table, f.name), getattr(again, f.name))
        for f in dataclasses.fields(table)
        if isinstance(getattr(table, f.name), np.ndarray)
    )
    table.check_sampler("ddim", 4, 0.5)
    for request in (("ddim", 5, 0.5), ("ddim", 4, 0.0), ("ddpm", 4, 0.5)):
        with pytest.raises(SchedulerTableError, match="the bundle's sampler is DDIM, 4 steps, eta 0.5"):
            table.check_sampler(*request)
    broken = table.to_dict()
    broken["noise_std"] = broken["noise_std"][:-1]
    with pytest.raises(SchedulerTableError, match="noise_std has shape"):
        SchedulerTable.from_dict(broken)
    with pytest.raises(SchedulerTableError, match="malformed scheduler table"):
        SchedulerTable.from_dict({"scheduler": "ddim"})
    with pytest.raises(SchedulerTableError, match="NaN"):
        SchedulerTable.from_dict({**table.to_dict(), "from_x0": [float("nan")] * 4})


def test_stochastic_sampling_differs_from_deterministic(tiny):
    backend, schedule = tiny
    runs = [
        sample(backend, capture_table(config, schedule), [0], (1, 8, 8), config, progress=False).samples
        for config in SAMPLERS[:2]
    ]
    assert not np.allclose(*runs)


@pytest.mark.slow
def test_torch_and_onnxruntime_backends_are_interchangeable(tiny, tmp_path):
    backend, schedule = tiny
    export_onnx(backend.model, tmp_path / "fp.onnx", (1, 8, 8))
    config = SamplerConfig("ddim", 4, 1.0)
    table = capture_table(config, schedule)
    by_torch = sample(backend, table, range(4), (1, 8, 8), config, progress=False).samples
    by_ort = sample(
        OnnxRuntimeBackend(tmp_path / "fp.onnx"), table, range(4), (1, 8, 8), config, progress=False
    ).samples
    assert np.allclose(by_torch, by_ort, atol=1e-4)


def test_karras_sigmas_only_where_the_scheduler_has_them(tiny):
    with pytest.raises(ValueError, match="DDIMScheduler .ddim. has no Karras sigmas; choose from dpm-solver"):
        capture_table(SamplerConfig("ddim", 4, karras_sigmas=True), tiny[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"scheduler": "heun"}, "unknown scheduler"), ({"steps": 0}, "at least 1"), ({"eta": 2.0}, "eta")],
)
def test_sampler_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


@pytest.mark.parametrize(
    "config",
    [SamplerConfig("ddim", 20), SamplerConfig("dpm-solver++", 20), SamplerConfig("euler", 20)],
    ids=lambda c: c.describe(),
)
@pytest.mark.slow
def test_v_prediction_is_converted_by_the_table(demo, config):
    """The table's coefficients act on whatever the network predicts: a v-prediction schedule (the demo's network
    read as v, which is all the arithmetic needs) samples as diffusers' loop does."""
    backend, schedule = demo
    schedule = {**schedule, "prediction_type": "v_prediction"}
    table = capture_table(config, schedule)
    assert table.prediction_type == "v_prediction"
    ours = sample(
        backend,
        table,
        [0, 1],
        (1, 16, 16),
        config,
        progress=False,
        clip=False,
        noise_streams=lambda s: [DiffusersNoise(seed) for seed in s],
    ).samples
    assert np.abs(ours - diffusers_samples(backend, config, schedule, [0, 1], (1, 16, 16))).max() <= 1e-5 * max(
        1.0, table.init_noise_sigma
    )


def test_methods_that_need_epsilon_refuse_other_predictions(tiny_model_dir, tmp_path):
    import json
    import shutil

    from conftest import assert_one_line_error, run_cli

    model = tmp_path / "v-model"
    shutil.copytree(tiny_model_dir, model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    for option in (["--correction", "ptqd"], ["--calibrator", "mixed-order"]):
        result = run_cli("export-quantized", "--model", model, "--out", tmp_path / "b", "--no-progress", *option)
        assert_one_line_error(result, "this model predicts 'v_prediction'")
    for calibrator in ("multistep", "mixed-order"):  # they unroll DDIM steps, from DDIM or DDPM states only
        result = run_cli(
            "export-quantized",
            "--model",
            tiny_model_dir,
            "--out",
            tmp_path / "b",
            "--scheduler",
            "euler",
            "--calibrator",
            calibrator,
        )
        assert_one_line_error(result, f"--calibrator {calibrator} unrolls DDIM steps")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v-model"]
