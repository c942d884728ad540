"""From a calibrated fake-quant model to a deployable bundle: Q/DQ ONNX export, parity, bundle I/O."""

from stepquant.export.bundle import FORMAT_VERSION, Bundle, BundleError, load_bundle, staged_directory, write_manifest
from stepquant.export.onnx_export import INPUT_NAMES, OUTPUT_NAME, OnnxExportError, export_onnx
from stepquant.export.parity import ParityReport, check_parity

__all__ = [
    "FORMAT_VERSION",
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "Bundle",
    "BundleError",
    "OnnxExportError",
    "ParityReport",
    "check_parity",
    "export_onnx",
    "load_bundle",
    "staged_directory",
    "write_manifest",
]
