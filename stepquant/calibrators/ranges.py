"""Activation range calibration: observe every quantized layer's input on the FP network over the
calibration set, then fix one scale per tensor."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from stepquant.calibrators.data import CalibrationSet
from stepquant.calibrators.observers import OBSERVER_METHODS, RangeObserver
from stepquant.quant.quantize import quantized_layers


class CalibrationError(RuntimeError):
    """Calibration met data it cannot turn into a valid range (NaN, inf, or an all-zero tensor)."""


def calibrate_ranges(
    model: nn.Module,
    data: CalibrationSet,
    method: str = "max",
    percentile: float = 99.99,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, float]:
    """Set the input scale of every fake-quant layer of `model` (an EpsilonModel); return the amax values.

    Observation runs with quantization disabled (FP activations, as modelopt calibrates).
    """
    if method not in OBSERVER_METHODS:
        raise ValueError(f"unknown observer method {method!r}; choose from {', '.join(OBSERVER_METHODS)}")
    layers = list(quantized_layers(model))
    observers = {name: RangeObserver(name) for name, _ in layers}
    for name, layer in layers:
        layer.set_enabled(False)
        layer.input_quantizer.observer = observers[name]
    try:
        with torch.inference_mode():
            for samples, timesteps in tqdm(list(data.batches(batch_size)), desc="observing ranges", unit="batch",
                                           disable=not progress, leave=False):
                model(samples, timesteps)
    except FloatingPointError as err:
        raise CalibrationError(str(err)) from err
    finally:
        for _, layer in layers:
            layer.input_quantizer.observer = None
            layer.set_enabled(True)
    amax: dict[str, float] = {}
    for name, layer in layers:
        quantizer = layer.input_quantizer
        amax[name] = observers[name].amax(method, quantizer.grid, percentile)
        try:
            quantizer.set_amax(amax[name])
        except ValueError as err:
            raise CalibrationError(f"cannot calibrate the input of {name}: {err}") from err
    return amax
