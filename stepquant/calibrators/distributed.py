"""Calibration over several processes on torch.distributed, started by torchrun:

    torchrun --standalone --nproc-per-node 2 --no-python export-quantized --calibrator reconstruct ...

Each rank samples its share of the calibration seeds; what the ranks saw is combined where it is reduced:
range maxima with MAX (so minmax scales equal one process's, bit for bit), histograms for percentile and mse
with SUM over a common grid, reconstruction's gradients averaged (data-parallel, every rank keeps the same
parameters), correction statistics summed. Rank 0 alone exports, evaluates and writes the bundle; the others
write nothing. A rank that fails makes torchrun stop the others (SIGTERM: rank 0 removes its staging).

Without torchrun's environment (WORLD_SIZE unset or 1) every function here is the identity.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from stepquant.errors import StepquantError

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # one rank's block reconstruction may take this long


class DistributedError(StepquantError, RuntimeError):
    """torch.distributed could not be set up from torchrun's environment."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process writes output (rank 0, or the only process)."""
    return rank() == 0


def init_from_env(device: torch.device) -> int:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), gloo
    on the CPU, NCCL on GPUs (each rank on cuda:LOCAL_RANK); return the world size (1 without torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return world_size()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE is {size} but {', '.join(missing)} is not set: start several processes "
            "with torchrun (torchrun --standalone --nproc-per-node N --no-python export-quantized ...)"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    except Exception as err:  # torch's own (RuntimeError, DistBackendError, ValueError)
        raise DistributedError(f"cannot join the {backend} process group: {' '.join(str(err).split())[:200]}") from err
    return world_size()


def rank_device(device: torch.device) -> torch.device:
    """A CUDA --device under torchrun means this rank's own GPU (cuda:LOCAL_RANK)."""
    if device.type == "cuda" and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(count: int, chunk: int) -> list[int]:
    """This rank's positions among `count` calibration samples: chunks of `chunk` consecutive positions dealt
    round-robin (each chunk is one trajectory batch, the same batch one process would run); every rank must get
    at least one."""
    chunks = [list(range(start, min(start + chunk, count))) for start in range(0, count, chunk)]
    if len(chunks) < world_size():
        raise DistributedError(
            f"--calib-samples {count} in batches of {chunk} (--calib-batch) make {len(chunks)} batch"
            f"{'es' if len(chunks) > 1 else ''} for {world_size()} processes: give every process at least "
            "one (more samples or a smaller --calib-batch)"
        )
    return [position for c in chunks[rank() :: world_size()] for position in c]


def _reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if world_size() == 1:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    work = tensor.detach().to(device).clone()
    dist.all_reduce(work, op=op)
    return work.to(tensor.device)


def reduce_max(values: torch.Tensor) -> torch.Tensor:
    return _reduce(values, dist.ReduceOp.MAX)


def reduce_sum(values: torch.Tensor) -> torch.Tensor:
    return _reduce(values, dist.ReduceOp.SUM)


def average_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's gradient with its mean over the ranks (one flat all_reduce)."""
    if world_size() == 1:
        return
    parameters = list(parameters)
    for parameter in parameters:  # every rank reduces the same list, used or not this iteration
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    grads = [p.grad for p in parameters]
    if not grads:
        return
    flat = reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast(value: object) -> object:
    """Rank 0's `value` on every rank (any picklable object)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
