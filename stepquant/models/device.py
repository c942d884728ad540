"""Where torch runs during an export (`--device auto|cpu|cuda[:N]`) and in what float type the FP reference
runs there (`--dtype`). Everything else stays as it was: calibration data, graphs and parity feeds live on
the CPU in float32, `EpsilonModel` moves its inputs to its own device and returns float32 on theirs, and the
quantizers' arithmetic stays float32 on any device."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from stepquant.errors import StepquantError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceError(StepquantError, ValueError):
    """The device or dtype asked for is not available here."""


@dataclass(frozen=True)
class Placement:
    """The resolved `--device` and `--dtype` of the FP reference (the quantized model runs in float32)."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def is_default(self) -> bool:
        return self.device.type == "cpu" and self.dtype == torch.float32

    def describe(self) -> dict:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {
            "device": str(self.device),
            "device_name": name,
            "fp_dtype": str(self.dtype).removeprefix("torch."),
            **({"cuda_float32": "ieee (no TF32)"} if self.device.type == "cuda" else {}),
        }


def resolve_device(spec: str) -> torch.device:
    """'auto' (the first CUDA device if torch sees one, else the CPU), 'cpu', 'cuda' or 'cuda:N'; a device this
    machine lacks is refused in one line."""
    if not isinstance(spec, str) or not DEVICE_PATTERN.fullmatch(spec):
        raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(
            f"--device {spec}: torch sees no CUDA device on this machine (torch {torch.__version__}, {built}); "
            "use --device cpu or auto"
        )
    index = int(spec.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"--device {spec}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
            f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})"
        )
    return torch.device("cuda", index)


def resolve_placement(device: str = "cpu", dtype: str = "float32") -> Placement:
    if dtype not in DTYPES:
        raise DeviceError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return Placement(resolve_device(device), DTYPES[dtype])


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`module` moved (in place) to `device` and, given, cast to `dtype`; the failure of a device that cannot
    hold it (out of memory) in one line."""
    try:
        return module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
    except (RuntimeError, torch.OutOfMemoryError) as err:
        raise _cannot_place(device, err) from err


def _cannot_place(device: torch.device, err: Exception) -> DeviceError:
    return DeviceError(f"cannot place the model on {device}: {' '.join(str(err).split())[:200]}")


def device_copy(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A deep copy of `module` whose parameters and buffers are made on `device` in `dtype` one by one, so the
    host never holds a second full copy of a model it is about to move (float buffers only are cast)."""
    memo: dict[int, object] = {}
    for parameter in module.parameters():
        memo[id(parameter)] = torch.nn.Parameter(parameter.detach().to(device, dtype), parameter.requires_grad)
    for buffer in module.buffers():
        memo[id(buffer)] = buffer.to(device, dtype if buffer.is_floating_point() else buffer.dtype)
    try:
        return copy.deepcopy(module, memo)
    except (RuntimeError, torch.OutOfMemoryError) as err:
        raise _cannot_place(device, err) from err


@contextlib.contextmanager
def placed(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """`module` on `device` for the block, and back where it was after it (a no-op where it already is)."""
    home, _ = module_placement(module)
    place(module, device)
    try:
        yield module
    finally:
        place(module, home)


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Float32 convolutions and matrix products on CUDA in IEEE float32 for the block. torch lets cuDNN
    convolutions use TF32 by default (10-bit mantissa, about 1e-3 relative error): enough to move
    calibration targets and, in parity, to flip Q/DQ rounding ties the CPU graph does not flip."""
    switches = [
        (torch.backends.cudnn.conv, "fp32_precision", "ieee"),
        (torch.backends.cuda.matmul, "fp32_precision", "ieee"),
    ]
    if not all(hasattr(owner, name) for owner, name, _ in switches):  # torch < 2.9: the legacy switches
        switches = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    saved = [getattr(owner, name) for owner, name, _ in switches]
    for owner, name, value in switches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(switches, saved):
            setattr(owner, name, value)


def module_placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and float type of a module's first parameter (CPU float32 for one without parameters)."""
    parameter = next(module.parameters(), None)
    return (parameter.device, parameter.dtype) if parameter is not None else (torch.device("cpu"), torch.float32)


def missing_kernel(err: RuntimeError, dtype: torch.dtype, device: torch.device) -> DeviceError | None:
    """A one-line error for torch's "not implemented for 'Half'" (an op without a kernel for the reference's
    float type on this device); None for any other error."""
    message = str(err)
    if "not implemented for" not in message:
        return None
    return DeviceError(
        f"--dtype {str(dtype).removeprefix('torch.')} on {device.type}: "
        f"{' '.join(message.split())[:160]}; use --dtype float32 there"
    )
