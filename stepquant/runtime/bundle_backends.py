"""Backends for the graphs a bundle carries: the deployed Q/DQ graph and its FP reference."""

from __future__ import annotations

from stepquant.export.bundle import Bundle
from stepquant.runtime.onnxruntime_backend import OnnxRuntimeBackend


def quantized_backend(bundle: Bundle, threads: int | None = None) -> OnnxRuntimeBackend:
    level = bundle.manifest.get("onnxruntime", {}).get("graph_optimization_level", "all")
    return OnnxRuntimeBackend(bundle.file(bundle.manifest["timestep_groups"][0]["graph"]), threads, optimization_level=level)


def reference_backend(bundle: Bundle, threads: int | None = None) -> OnnxRuntimeBackend:
    """The FP32 graph, parity-checked against the FP torch model at export."""
    return OnnxRuntimeBackend(bundle.file(bundle.manifest["reference_graph"]), threads)
