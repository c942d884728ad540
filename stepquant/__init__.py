"""stepquant: timestep- and trajectory-aware post-training quantization of diffusion models,
exported as Q/DQ ONNX bundles for TensorRT and onnxruntime."""

from stepquant.export import load_bundle
from stepquant.pipeline import ExportConfig, export_quantized
from stepquant.quant import QuantSpec, quantize_

__all__ = ["ExportConfig", "QuantSpec", "export_quantized", "load_bundle", "quantize_"]
