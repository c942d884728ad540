"""The CUDA runtime calls the TensorRT backend makes on numpy buffers (stepquant.runtime.cuda, ctypes on
libcudart): a round trip through device memory. Skips where there is no CUDA runtime or no GPU."""

import numpy as np
import pytest

from stepquant.runtime.cuda import Cuda, CudaError


@pytest.fixture(scope="module")
def cuda():
    try:
        return Cuda()
    except CudaError as err:
        pytest.skip(f"no usable CUDA runtime here: {err}")


def test_arrays_round_trip_through_device_memory(cuda):
    rng = np.random.default_rng(0)
    for shape, dtype in (((2, 4, 16, 16), np.float32), ((3,), np.float16), ((5, 7), np.int32)):
        array = rng.standard_normal(shape).astype(dtype)
        pointer = cuda.malloc(array.nbytes)
        try:
            cuda.to_device(pointer, array)
            back = np.empty_like(array)
            cuda.to_host(back, pointer)
        finally:
            cuda.free(pointer)
        assert np.array_equal(back, array)


def test_a_failed_call_is_one_line(cuda):
    with pytest.raises(CudaError, match="cudaMalloc failed: .*CUDA error"):
        cuda.malloc(1 << 62)  # more than any GPU holds


def test_a_failed_call_leaves_no_error_behind_for_torch(cuda):
    """A failed cudaMalloc is also recorded as the process's last CUDA error; left there, torch's next CUDA
    call in the same process reported it as its own out-of-memory (seen on an H200)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device here")
    with pytest.raises(CudaError):
        cuda.malloc(1 << 62)
    assert cuda.lib.cudaGetLastError() == 0
    assert float(torch.ones(4, device="cuda").sum()) == 4.0
