"""Deployment-side execution, on numpy: interchangeable backends (`out = backend(sample, timestep)`) for
onnxruntime and TensorRT, and the sampler host loop that drives them with the bundle's scheduler table.

Nothing here imports torch, diffusers, onnx or Polygraphy, nor stepquant's export, calibrators or models:
`pip install stepquant` (numpy, onnxruntime, safetensors) is enough to run a bundle.
"""

from stepquant.bundle import Bundle, load_bundle
from stepquant.runtime.backend import Backend
from stepquant.runtime.bundle_backends import (
    bundle_corrections,
    bundle_sampler,
    bundle_table,
    quantized_backend,
    reference_backend,
)
from stepquant.runtime.corrections import Corrections
from stepquant.runtime.guidance import Conditioning
from stepquant.runtime.onnxruntime_backend import OnnxRuntimeBackend
from stepquant.runtime.openvino_backend import OpenVINOBackend
from stepquant.runtime.sampler import SampleOutput, SamplerConfig, sample, sample_batches
from stepquant.runtime.scheduler_table import SchedulerTable
from stepquant.runtime.tensorrt_backend import TensorRTBackend

__all__ = [
    "Backend",
    "Bundle",
    "Conditioning",
    "Corrections",
    "OnnxRuntimeBackend",
    "SampleOutput",
    "SamplerConfig",
    "OpenVINOBackend",
    "SchedulerTable",
    "TensorRTBackend",
    "bundle_corrections",
    "bundle_sampler",
    "bundle_table",
    "load_bundle",
    "quantized_backend",
    "reference_backend",
    "sample",
    "sample_batches",
]
