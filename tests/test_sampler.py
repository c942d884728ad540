"""The host loop: per-sample seeding independent of batching, deterministic and stochastic samplers."""

import pytest
import torch

from stepquant.export import export_onnx
from stepquant.models import EpsilonModel, load_model
from stepquant.runtime import OnnxRuntimeBackend, SamplerConfig, TorchBackend, sample


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    return TorchBackend(EpsilonModel(loaded.denoiser)), loaded.scheduler_config


@pytest.mark.parametrize("config", [SamplerConfig("ddim", 4, 0.0), SamplerConfig("ddim", 4, 1.0), SamplerConfig("ddpm", 4)])
def test_each_seed_gives_the_same_sample_whatever_the_batch(tiny, config):
    backend, schedule = tiny
    together = sample(backend, schedule, [3, 4, 5], (1, 8, 8), config, batch_size=3, progress=False).samples
    alone = sample(backend, schedule, [4], (1, 8, 8), config, batch_size=1, progress=False).samples
    assert torch.allclose(together[1], alone[0], atol=1e-5)
    assert not torch.allclose(together[0], together[1])
    assert together.abs().max() <= 1.0


def test_stochastic_sampling_differs_from_deterministic(tiny):
    backend, schedule = tiny
    deterministic = sample(backend, schedule, [0], (1, 8, 8), SamplerConfig("ddim", 4, 0.0), progress=False).samples
    stochastic = sample(backend, schedule, [0], (1, 8, 8), SamplerConfig("ddim", 4, 1.0), progress=False).samples
    assert not torch.allclose(deterministic, stochastic)


def test_torch_and_onnxruntime_backends_are_interchangeable(tiny, tmp_path):
    backend, schedule = tiny
    export_onnx(backend.model, tmp_path / "fp.onnx", (1, 8, 8))
    config = SamplerConfig("ddim", 4, 1.0)
    by_torch = sample(backend, schedule, range(4), (1, 8, 8), config, progress=False).samples
    by_ort = sample(OnnxRuntimeBackend(tmp_path / "fp.onnx"), schedule, range(4), (1, 8, 8), config, progress=False).samples
    assert torch.allclose(by_torch, by_ort, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [({"scheduler": "euler"}, "unknown scheduler"),
                                             ({"steps": 0}, "at least 1"), ({"eta": 2.0}, "eta")])
def test_sampler_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)
