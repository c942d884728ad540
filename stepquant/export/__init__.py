"""From a calibrated fake-quant model to a deployable bundle: Q/DQ ONNX export (onnx_export, precision,
targets), TensorRT conformance (lint, tensorrt), parity (parity, layerwise) and the bundle writer (bundle).
Import the submodule you need: this package imports nothing, so the light ones stay light."""
