"""What a bundle carries, ready to run: the deployed Q/DQ graph (on onnxruntime, or as a TensorRT engine),
its FP reference graph, its scheduler table and its correction terms."""

from __future__ import annotations

from pathlib import Path

from stepquant.bundle import Bundle, BundleError, TimestepGroup
from stepquant.runtime.backend import Backend
from stepquant.runtime.corrections import CorrectionError, Corrections
from stepquant.runtime.onnxruntime_backend import OnnxRuntimeBackend
from stepquant.runtime.sampler import SamplerConfig
from stepquant.runtime.scheduler_table import SchedulerTable
from stepquant.runtime.tensorrt_backend import TensorRTBackend, tensorrt_version
from stepquant.runtime.timestep_groups import TimestepGroupBackend

BACKENDS = ("onnxruntime", "tensorrt")


def _per_group(backends: list[Backend], groups: list[TimestepGroup]) -> Backend:
    return backends[0] if len(groups) == 1 else TimestepGroupBackend(backends, [g.timesteps for g in groups])


def graph_backend(graphs: list[Path], groups: list[TimestepGroup], threads: int | None = None,
                  optimization_level: str = "all") -> Backend:
    """The deployed graphs of a target's timestep groups (their paths, in the groups' order), on onnxruntime."""
    return _per_group([OnnxRuntimeBackend(graph, threads, optimization_level=optimization_level) for graph in graphs], groups)


def plan_file(onnx_file: str) -> str:
    """The engine built from `onnx_file` sits beside it with the same stem: model_g1.onnx -> model_g1.plan,
    text_encoder/model.onnx -> text_encoder/model.plan."""
    return Path(onnx_file).with_suffix(".plan").as_posix()


def engine_path(bundle: Bundle, graph: str, engine: Path | None = None) -> Path:
    """The engine to run for one of `bundle`'s graphs: `engine` if given (single-graph bundles only), else
    the plan `stepquant build-engine` added to the bundle (listed and hashed in its manifest). A plan that
    build_engine.sh wrote beside the graph is no part of the bundle: name it with --engine."""
    if engine and len(bundle.target("tensorrt").timestep_groups) > 1:
        raise BundleError("--engine names one plan, but this bundle has one graph per timestep group; "
                          "build its plans with `stepquant build-engine`")
    if engine:
        if not Path(engine).is_file():
            raise BundleError(f"no TensorRT engine at {engine}")
        return Path(engine)
    plan = plan_file(graph)
    if plan not in bundle.manifest.files:
        raise BundleError(f"bundle {bundle.path} holds no TensorRT engine {plan}: run `bash build_engine.sh` in the bundle "
                          f"and pass --engine {bundle.path}/{plan}, or add it with `stepquant build-engine --bundle {bundle.path}`")
    return bundle.file(plan)


def quantized_backend(bundle: Bundle, threads: int | None = None, backend: str = "onnxruntime",
                      engine: Path | None = None, target: str | None = None) -> Backend:
    """The bundle's quantized graph(s) on `backend`: TensorRT runs the tensorrt profile's engines (one per
    timestep group); onnxruntime the onnxruntime-cpu profile when the bundle has it (else the tensorrt
    graph), or the `target` named."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    section = bundle.target(target or bundle.target_for(backend))
    groups = section.timestep_groups
    if backend == "tensorrt":
        tensorrt_version()  # say TensorRT is missing before asking for an engine
        return _per_group([TensorRTBackend(engine_path(bundle, g.graph, engine)) for g in groups], groups)
    return graph_backend([bundle.file(g.graph) for g in groups], groups, threads, section.onnxruntime_optimization_level)


def reference_backend(bundle: Bundle, threads: int | None = None) -> OnnxRuntimeBackend:
    """The FP32 graph, parity-checked against the FP torch model at export."""
    return OnnxRuntimeBackend(bundle.file(bundle.manifest.reference_graph), threads)


def bundle_sampler(bundle: Bundle) -> SamplerConfig:
    """The sampler the bundle was exported with (its table is `bundle_table`)."""
    sampler = bundle.manifest.sampler
    return SamplerConfig(sampler.scheduler, sampler.steps, sampler.eta, sampler.guidance_scale, sampler.karras_sigmas)


def bundle_table(bundle: Bundle) -> SchedulerTable:
    """The sampler the bundle was exported with, as the scheduler table captured from diffusers at export."""
    try:
        return SchedulerTable.from_dict(bundle.manifest.scheduler_table)
    except ValueError as err:
        raise BundleError(f"bundle {bundle.path}: {err}") from err


def bundle_corrections(bundle: Bundle) -> Corrections | None:
    """The bundle's per-timestep correction terms, or None when it was exported without."""
    name = bundle.manifest.correction_file
    if not name:
        return None
    corrections = Corrections.load(bundle.file(name))
    if corrections.method != bundle.manifest.correction_method:
        raise CorrectionError(f"{name} holds {corrections.method!r} terms but the manifest says "
                              f"{bundle.manifest.correction_method!r}")
    return corrections
