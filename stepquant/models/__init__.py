"""Model loading: the bundled demo model by name, or any local diffusers model directory."""

from stepquant.models.epsilon import EpsilonModel
from stepquant.models.loading import DEMO_MODEL_NAME, LoadedModel, ModelLoadError, load_model

__all__ = ["DEMO_MODEL_NAME", "EpsilonModel", "LoadedModel", "ModelLoadError", "load_model"]
