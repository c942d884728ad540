"""The backend contract: a callable from (sample, timestep, **conditions) to the network output, on numpy arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Backend(Protocol):
    """`out = backend(sample, timestep, **conditions)` with sample [B,C,H,W] float32, timestep [B] float32
    and, for conditional models, their named condition inputs (text embeddings...), batch first.

    onnxruntime, TensorRT and (on the export side) torch backends are interchangeable behind this call, so
    the sampler and its host-side corrections run the same whatever executes the network.
    """

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditions: np.ndarray) -> np.ndarray: ...


def graph_feed(
    names: Sequence[str], sample: np.ndarray, timestep: np.ndarray, conditions: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The feed dict of a graph with inputs `names` (sample, timestep, then the conditions), float32."""
    arrays = {"sample": sample, "timestep": timestep, **conditions}
    missing = [name for name in names if name not in arrays]
    if missing:
        raise ValueError(f"the graph needs the inputs {', '.join(missing)}: pass the model's conditioning")
    return {name: np.ascontiguousarray(arrays[name], dtype=np.float32) for name in names}
