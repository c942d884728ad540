"""Deployment-side execution: interchangeable backends (`eps = backend(sample, timestep)`) and the
sampler host loop that drives them with a diffusers scheduler."""

from stepquant.runtime.backend import Backend
from stepquant.runtime.onnxruntime_backend import OnnxRuntimeBackend
from stepquant.runtime.sampler import SampleOutput, SamplerConfig, make_scheduler, sample
from stepquant.runtime.torch_backend import TorchBackend

__all__ = ["Backend", "OnnxRuntimeBackend", "SampleOutput", "SamplerConfig", "TorchBackend", "make_scheduler", "sample"]
