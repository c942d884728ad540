"""The backend contract: a callable from (sample, timestep) to the noise estimate, on CPU tensors."""

from __future__ import annotations

from typing import Protocol

import torch


class Backend(Protocol):
    """`eps = backend(sample, timestep)` with sample [B,C,H,W] float32 and timestep [B] float32.

    Torch, onnxruntime and TensorRT backends are interchangeable behind this call, so the sampler
    and its host-side corrections run the same whatever executes the network.
    """

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...
