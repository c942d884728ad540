"""Runs an exported graph (FP or Q/DQ) with OpenVINO (`pip install 'stepquant[openvino]'`): its CPU plugin
executes a bundle's Q/DQ graph with integer kernels, and Intel GPUs and NPUs take the same graph.

Floating-point work is kept at FP32 (OpenVINO's CPU plugin would otherwise pick bf16 on CPUs with AMX), so
the only rounding that differs from the simulation is that of OpenVINO's fused integer kernels; the bundle's
PSNR on this backend says how much that is.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from stepquant.errors import StepquantError
from stepquant.runtime.backend import graph_feed


class OpenVINOUnavailable(StepquantError, RuntimeError):
    """OpenVINO is not installed, or the device asked for is not on this machine."""


def openvino():
    try:
        import openvino as ov
    except ImportError as err:
        raise OpenVINOUnavailable("OpenVINO is not installed: pip install 'stepquant[openvino]'") from err
    return ov


class OpenVINOBackend:
    """One compiled graph on one OpenVINO device ("CPU", "GPU", "NPU", "AUTO"), with one infer request reused."""

    def __init__(
        self,
        model_path: str | Path,
        threads: int | None = None,
        device: str = "CPU",
        properties: Mapping[str, object] | None = None,
    ) -> None:
        ov = openvino()
        core = ov.Core()
        if device != "AUTO" and device.split(".")[0] not in {d.split(".")[0] for d in core.available_devices}:
            raise OpenVINOUnavailable(
                f"OpenVINO device {device!r} is not on this machine (it has {', '.join(core.available_devices)})"
            )
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if device.startswith("CPU"):
            config["INFERENCE_PRECISION_HINT"] = "f32"
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
        config.update(properties or {})
        self.model_path = Path(model_path)
        try:
            self.compiled = core.compile_model(core.read_model(str(self.model_path)), device, config)
        except Exception as err:  # OpenVINO raises RuntimeError subclasses of its own
            raise ValueError(f"OpenVINO cannot compile {self.model_path}: {' '.join(str(err).split())[:300]}") from err
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output for inputs by name, copied out of the request's buffers."""
        self.request.infer({name: np.ascontiguousarray(array) for name, array in feeds.items()})
        return [np.array(self.request.get_output_tensor(i).data) for i in range(len(self.compiled.outputs))]

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditions: np.ndarray) -> np.ndarray:
        return self.run(graph_feed(self.input_names, sample, timestep, conditions))[0]
