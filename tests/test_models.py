"""Model loading by name and directory, the digits data, and the errors for what is not a model."""

import json

import pytest
import torch

from stepquant.data.digits import load_digits_16
from stepquant.models import DEMO_MODEL_NAME, ModelLoadError, load_model


def test_demo_model_loads_by_name():
    loaded = load_model(DEMO_MODEL_NAME)
    assert loaded.denoiser.config.sample_size == 16 and loaded.denoiser.config.in_channels == 1
    assert 0.8e6 < sum(p.numel() for p in loaded.denoiser.parameters()) < 1.5e6
    assert loaded.scheduler_config["num_train_timesteps"] == 1000


def test_pipeline_and_bare_model_directories(tiny_model_dir):
    assert load_model(str(tiny_model_dir)).denoiser.config.sample_size == 8
    assert load_model(str(tiny_model_dir / "unet")).scheduler_config["beta_schedule"] == "linear"


def test_refusals(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="not a diffusers model directory"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ModelLoadError, match="AutoencoderKL"):
        load_model(str(tmp_path))


def test_digits_are_upsampled_to_16x16_in_range():
    images, labels = load_digits_16()
    assert images.shape == (1797, 1, 16, 16) and labels.shape == (1797,)
    assert images.min() >= -1.0 and images.max() <= 1.0 and set(labels.tolist()) == set(range(10))
    assert torch.isfinite(images).all()
