"""Quantizer core shared by calibration and export: the integer grid, fake-quant layers, `quantize_`."""

from stepquant.quant.grid import Fp8Grid, IntGrid
from stepquant.quant.layers import ActivationQuantizer, QuantizedLayer, WeightQuantizer
from stepquant.quant.quantize import quantize_, quantized_layers
from stepquant.quant.spec import DEFAULT_EXCLUDE, QuantSpec

__all__ = [
    "DEFAULT_EXCLUDE",
    "ActivationQuantizer",
    "Fp8Grid",
    "IntGrid",
    "QuantSpec",
    "QuantizedLayer",
    "WeightQuantizer",
    "quantize_",
    "quantized_layers",
]
