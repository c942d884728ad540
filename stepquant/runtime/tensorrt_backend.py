"""Runs a bundle's TensorRT engine on numpy buffers with tensorrt's own API (no torch, no Polygraphy: what a
Jetson has), behind the same backend contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stepquant.errors import StepquantError
from stepquant.runtime.backend import graph_feed
from stepquant.runtime.cuda import Cuda


class TensorRTUnavailable(StepquantError, RuntimeError):
    """The `tensorrt` package is not importable on this machine."""


def tensorrt_version() -> str:
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTUnavailable(
            "TensorRT is not installed (pip install tensorrt on x86-64 with an NVIDIA GPU; on Jetson it ships "
            "with JetPack); alternatively run the bundle's build_engine.sh where trtexec is available"
        ) from err
    return tensorrt.__version__


class TensorRTBackend:
    """One engine (built for its GPU and TensorRT version by build_engine.sh or `stepquant build-engine`),
    its input shapes set per call within the engine's optimisation profile."""

    def __init__(self, engine_path: str | Path) -> None:
        tensorrt_version()  # a clear error where TensorRT is missing
        import tensorrt as trt

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ValueError(f"TensorRT cannot deserialize {engine_path}: build it with this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.cuda = Cuda()
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                self.cuda.free(pointer)
            pointer = self.cuda.malloc(nbytes)
            self.buffers[name] = (pointer, nbytes)
        return pointer

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output, in the engine's order, for inputs by name (any graph: denoiser, text encoder, VAE)."""
        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name], dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_input_shape(name, array.shape)
            pointer = self._buffer(name, array.nbytes)
            self.cuda.to_device(pointer, array)
            self.context.set_tensor_address(name, pointer)
        results = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            results.append(np.empty(shape, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name))))
            self.context.set_tensor_address(name, self._buffer(name, results[-1].nbytes))
        if not self.context.execute_async_v3(self.cuda.stream.value or 0):
            raise RuntimeError("TensorRT failed to run the engine (see its log above)")
        for name, array in zip(self.output_names, results):
            self.cuda.to_host(array, self.buffers[name][0])
        return results

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditions: np.ndarray) -> np.ndarray:
        outputs = self.run(graph_feed(self.input_names, sample, timestep, conditions))
        named = dict(zip(self.output_names, outputs))
        return named.get("eps", outputs[0]).astype(np.float32, copy=False)

    def __del__(self) -> None:
        for pointer, _ in getattr(self, "buffers", {}).values():
            self.cuda.free(pointer)
