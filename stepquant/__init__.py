"""stepquant: timestep- and trajectory-aware post-training quantization of diffusion models,
exported as Q/DQ ONNX bundles for TensorRT and onnxruntime.

The names below are imported on first use, so `import stepquant.cli.entry` (the commands' entry point) and
the runtime do not pay for torch, diffusers and onnx until they need them.
"""

from __future__ import annotations

import importlib

_CONFIGS = ("ExportConfig", "CalibrationConfig", "CorrectionConfig", "ConditioningConfig", "ChecksConfig")
_EXPORTS = {
    **dict.fromkeys(_CONFIGS, "stepquant.export.config"),
    "export_quantized": "stepquant.pipeline",
    "load_bundle": "stepquant.bundle",
    "generate": "stepquant.runtime.text_to_image",
    "QuantSpec": "stepquant.quant",
    "quantize_": "stepquant.quant",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stepquant' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
