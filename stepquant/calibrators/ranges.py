"""Activation range calibration: observe every quantized layer's input on the FP network over the
calibration set, then fix one scale per tensor."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from stepquant.calibrators import distributed
from stepquant.calibrators.data import CalibrationSet
from stepquant.calibrators.observers import OBSERVER_METHODS, RangeObserver
from stepquant.errors import StepquantError
from stepquant.quant.layers import ActivationQuantizer
from stepquant.quant.quantize import quantized_layers


class CalibrationError(StepquantError, RuntimeError):
    """Calibration met data it cannot turn into a valid range (NaN, inf, or an all-zero tensor)."""


@contextmanager
def observing_fp(model: nn.Module) -> Iterator[list[tuple[str, ActivationQuantizer]]]:
    """Quantization off (FP activations, as modelopt calibrates) while the caller's observers, set on the
    yielded (name, activation quantizer) pairs, watch their inputs; observers removed and quantization
    restored on exit."""
    layers = [layer for _, layer in quantized_layers(model)]
    quantizers = [(name, m) for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)]
    for layer in layers:
        layer.set_enabled(False)
    for _, quantizer in quantizers:
        quantizer.enabled = False
    try:
        yield quantizers
    finally:
        for _, quantizer in quantizers:
            quantizer.observer = None
            quantizer.enabled = True
        for layer in layers:
            layer.set_enabled(True)


def _observe(
    model: nn.Module,
    quantizers: list[tuple[str, ActivationQuantizer]],
    data: CalibrationSet,
    batch_size: int,
    progress: bool,
    spans: list[float] | None = None,
) -> dict[str, RangeObserver]:
    """One pass of the calibration set with an observer on each quantizer (on a fixed grid, given `spans`)."""
    observers = {name: RangeObserver(name, span=spans[i] if spans else 0.0) for i, (name, _) in enumerate(quantizers)}
    for name, quantizer in quantizers:
        quantizer.observer = observers[name]
    try:
        with torch.inference_mode():
            for inputs in tqdm(
                list(data.batches(batch_size)), desc="observing ranges", unit="batch", disable=not progress, leave=False
            ):
                model(*inputs)
    except FloatingPointError as err:
        raise CalibrationError(str(err)) from err
    return observers


def calibrate_ranges(
    model: nn.Module,
    data: CalibrationSet,
    method: str = "max",
    percentile: float = 99.99,
    batch_size: int = 64,
    progress: bool = True,
    only_uncalibrated: bool = False,
) -> dict[str, float]:
    """Set the scale of every activation quantizer of `model` (an EpsilonModel), or with
    `only_uncalibrated` of those without one yet (quantizers a target profile added after calibration);
    return the amax values keyed by quantizer name.

    Observation runs with quantization disabled (FP activations, as modelopt calibrates).
    """
    if method not in OBSERVER_METHODS:
        raise ValueError(f"unknown observer method {method!r}; choose from {', '.join(OBSERVER_METHODS)}")
    with observing_fp(model) as quantizers:
        quantizers = [(name, q) for name, q in quantizers if not (only_uncalibrated and q.calibrated)]
        if not quantizers:
            return {}
        observers = _observe(model, quantizers, data, batch_size, progress)
        if distributed.world_size() > 1:  # every rank's maxima, then histograms on one grid, summed
            spans = distributed.reduce_max(torch.tensor([o.max for o in observers.values()], dtype=torch.float64))
            if method != "max":
                observers = _observe(model, quantizers, data, batch_size, progress, spans.tolist())
                counts = distributed.reduce_sum(torch.stack([o.counts for o in observers.values()]))
                for observer, row in zip(observers.values(), counts):
                    observer.counts = row
            for observer, span in zip(observers.values(), spans.tolist()):
                observer.max = span
    amax: dict[str, float] = {}
    for name, quantizer in quantizers:
        amax[name] = observers[name].amax(method, quantizer.grid, percentile)
        try:
            quantizer.set_amax(amax[name])
        except ValueError as err:
            raise CalibrationError(f"cannot calibrate {name}: {err}") from err
    return amax
