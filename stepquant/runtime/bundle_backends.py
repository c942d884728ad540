"""Backends for what a bundle carries: the deployed Q/DQ graph (on onnxruntime, or as a TensorRT
engine) and its FP reference graph."""

from __future__ import annotations

from pathlib import Path

from stepquant.export.bundle import Bundle
from stepquant.runtime.backend import Backend
from stepquant.runtime.corrections import CorrectionError, Corrections
from stepquant.runtime.onnxruntime_backend import OnnxRuntimeBackend
from stepquant.runtime.timestep_groups import TimestepGroupBackend

BACKENDS = ("onnxruntime", "tensorrt")


def _per_group(backends: list[Backend], groups: list[dict]) -> Backend:
    return backends[0] if len(groups) == 1 else TimestepGroupBackend(backends, [g["timesteps"] for g in groups])


def graph_backend(graphs: list[Path], groups: list[dict], threads: int | None = None,
                  optimization_level: str = "all") -> Backend:
    """The deployed graphs of a manifest's `timestep_groups` (their paths, in the groups' order), on onnxruntime."""
    return _per_group([OnnxRuntimeBackend(graph, threads, optimization_level=optimization_level) for graph in graphs], groups)


def quantized_backend(bundle: Bundle, threads: int | None = None, backend: str = "onnxruntime",
                      engine: Path | None = None, target: str | None = None) -> Backend:
    """The bundle's quantized graph(s) on `backend`: TensorRT runs the tensorrt profile; onnxruntime the
    onnxruntime-cpu profile when the bundle has it (else the tensorrt graph), or the `target` named."""
    section = bundle.target(target or bundle.target_for(backend))
    groups = section["timestep_groups"]
    if backend == "tensorrt":
        from stepquant.export.tensorrt import engine_path, tensorrt_version
        from stepquant.runtime.tensorrt_backend import TensorRTBackend

        tensorrt_version()  # say TensorRT is missing before asking for an engine
        return _per_group([TensorRTBackend(engine_path(bundle, g["graph"], engine)) for g in groups], groups)
    if backend != "onnxruntime":
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return graph_backend([bundle.file(g["graph"]) for g in groups], groups, threads, section["onnxruntime_optimization_level"])


def reference_backend(bundle: Bundle, threads: int | None = None) -> OnnxRuntimeBackend:
    """The FP32 graph, parity-checked against the FP torch model at export."""
    return OnnxRuntimeBackend(bundle.file(bundle.manifest["reference_graph"]), threads)


def bundle_corrections(bundle: Bundle) -> Corrections | None:
    """The bundle's per-timestep correction terms, or None when it was exported without."""
    name = bundle.manifest.get("correction", {}).get("file")
    if not name:
        return None
    corrections = Corrections.load(bundle.file(name))
    if corrections.method != bundle.manifest["correction"]["method"]:
        raise CorrectionError(f"{name} holds {corrections.method!r} terms but the manifest says "
                              f"{bundle.manifest['correction']['method']!r}")
    return corrections
