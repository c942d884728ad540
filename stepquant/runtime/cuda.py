"""The few CUDA runtime calls a TensorRT engine needs to run on numpy buffers (device memory, copies, a
stream), through ctypes on libcudart: JetPack and the CUDA toolkit ship it, and neither torch, pycuda nor
Polygraphy has to be installed on the device."""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

from stepquant.errors import StepquantError

_HOST_TO_DEVICE, _DEVICE_TO_HOST = 1, 2
_NAMES = (
    "libcudart.so",
    "libcudart.so.13",
    "libcudart.so.12",
    "libcudart.so.11.0",
    "cudart64_12.dll",
    "cudart64_110.dll",
)


class CudaError(StepquantError, RuntimeError):
    """libcudart is missing or a CUDA call failed."""


def _library() -> ctypes.CDLL:
    found = ctypes.util.find_library("cudart")
    for name in ([found] if found else []) + list(_NAMES):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CudaError(
        "the CUDA runtime (libcudart) was not found: TensorRT engines need it (JetPack and the CUDA toolkit "
        "ship it; add its directory to LD_LIBRARY_PATH)"
    )


class Cuda:
    def __init__(self) -> None:
        self.lib = _library()
        self.stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(self.stream)), "cudaStreamCreate")

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            # the runtime also keeps the error as the process's last one, where the next library to ask for it
            # (torch's allocator, TensorRT) would take it for its own failure: clear it
            self.lib.cudaGetLastError()
            self.lib.cudaGetErrorString.restype = ctypes.c_char_p
            raise CudaError(f"{call} failed: {self.lib.cudaGetErrorString(status).decode()} (CUDA error {status})")

    def malloc(self, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
        return int(pointer.value)

    def free(self, pointer: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(pointer))

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self._check(
            self.lib.cudaMemcpyAsync(
                ctypes.c_void_p(pointer),
                array.ctypes.data_as(ctypes.c_void_p),
                ctypes.c_size_t(array.nbytes),
                _HOST_TO_DEVICE,
                self.stream,
            ),
            "cudaMemcpyAsync",
        )
        self.synchronize()  # `array` may be a temporary

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        self._check(
            self.lib.cudaMemcpyAsync(
                array.ctypes.data_as(ctypes.c_void_p),
                ctypes.c_void_p(pointer),
                ctypes.c_size_t(array.nbytes),
                _DEVICE_TO_HOST,
                self.stream,
            ),
            "cudaMemcpyAsync",
        )
        self.synchronize()

    def synchronize(self) -> None:
        self._check(self.lib.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
