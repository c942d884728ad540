"""Calibration: inputs taken from the FP model's own sampling trajectories, and range observers
that turn them into one activation scale per quantized tensor."""

from stepquant.calibrators.data import CalibrationSet, collect_calibration_set
from stepquant.calibrators.observers import OBSERVER_METHODS, RangeObserver
from stepquant.calibrators.ranges import CalibrationError, calibrate_ranges

__all__ = [
    "OBSERVER_METHODS",
    "CalibrationError",
    "CalibrationSet",
    "RangeObserver",
    "calibrate_ranges",
    "collect_calibration_set",
]
