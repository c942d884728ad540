"""The backend contract: a callable from (sample, timestep, **conditions) to the noise estimate, on CPU tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch


class Backend(Protocol):
    """`eps = backend(sample, timestep, **conditions)` with sample [B,C,H,W] float32, timestep [B] float32
    and, for conditional models, their named condition inputs (text embeddings...), batch first.

    Torch, onnxruntime and TensorRT backends are interchangeable behind this call, so the sampler
    and its host-side corrections run the same whatever executes the network.
    """

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor: ...


def graph_feed(names: Sequence[str], sample: torch.Tensor, timestep: torch.Tensor,
               conditions: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The feed dict of a graph with inputs `names` (sample, timestep, then the conditions), float32."""
    tensors = {"sample": sample, "timestep": timestep, **conditions}
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"the graph needs the inputs {', '.join(missing)}: pass the model's conditioning")
    return {name: np.ascontiguousarray(tensors[name].detach().cpu().numpy(), dtype=np.float32) for name in names}
