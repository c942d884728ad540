"""What a bundle carries, ready to run: the deployed Q/DQ graph (on onnxruntime, OpenVINO, or as a TensorRT
engine), its FP reference graph, its scheduler table and its correction terms.

Backends are a name -> `Engine` table. `auto` takes the first that can run here, in this order: TensorRT when
the bundle holds its engines and tensorrt imports; onnxruntime's CUDA provider when onnxruntime-gpu sees a GPU;
onnxruntime on the CPU when the bundle has the onnxruntime-cpu graph; OpenVINO (on the TensorRT graph) when
installed; onnxruntime on the CPU. On the CPU that is the fastest measured (docs/benchmarks/backends.md: the
onnxruntime-cpu graph led on the cifar10 UNet at batch 8 on an AVX2-only and on an AVX-512 VNNI EPYC; without
it, OpenVINO ran the TensorRT graph 1.4x-2.5x faster there than onnxruntime, which leaves its convolutions in
float, and as fast on the small demo at batch 1). Nothing of an engine is imported unless it is chosen or probed
by `auto`.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stepquant.bundle import Bundle, BundleError, TimestepGroup
from stepquant.bundle.manifest import StoredSampler
from stepquant.bundle.targets import ONNXRUNTIME_CPU, TENSORRT
from stepquant.runtime.backend import Backend
from stepquant.runtime.corrections import CorrectionError, Corrections
from stepquant.runtime.onnxruntime_backend import OnnxRuntimeBackend, provider_available
from stepquant.runtime.sampler import SamplerConfig
from stepquant.runtime.scheduler_table import SchedulerTable, SchedulerTableError
from stepquant.runtime.tensorrt_backend import TensorRTBackend, tensorrt_version
from stepquant.runtime.timestep_groups import TimestepGroupBackend


@dataclass(frozen=True)
class RunOptions:
    """How a backend runs a graph: threads (CPU backends), onnxruntime's provider and graph optimisation level
    (None: the target profile's), OpenVINO's device, and a TensorRT plan for a single-graph bundle."""

    threads: int | None = None
    provider: str = "cpu"
    optimization_level: str | None = None
    device: str = "CPU"
    engine: Path | None = None


def _open_onnxruntime(path: Path, options: RunOptions, level: str) -> Backend:
    return OnnxRuntimeBackend(path, options.threads, options.provider, options.optimization_level or level)


def _open_openvino(path: Path, options: RunOptions, level: str) -> Backend:
    from stepquant.runtime.openvino_backend import OpenVINOBackend

    return OpenVINOBackend(path, options.threads, options.device)


def _open_tensorrt(path: Path, options: RunOptions, level: str) -> Backend:
    return TensorRTBackend(path)


@dataclass(frozen=True)
class Engine:
    """A runtime backend: how it opens one graph file (a plan for TensorRT) and whether it can run on this
    machine (without importing more than a probe). The target profile it runs is the registry's
    (`Bundle.target_for`)."""

    open: Callable[[Path, RunOptions, str], Backend]
    available: Callable[[Bundle, RunOptions], bool]
    runs_plans: bool = False


def _importable(name: str) -> bool:
    """Whether `import name` would find a package (without importing it; a blocked sys.modules entry is not)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def _has_plans(bundle: Bundle, options: RunOptions) -> bool:
    return TENSORRT.name in bundle.manifest.targets and all(
        plan_file(g.graph) in bundle.manifest.files for g in bundle.target(TENSORRT.name).timestep_groups
    )


ENGINES: dict[str, Engine] = {
    "onnxruntime": Engine(_open_onnxruntime, lambda b, o: provider_available(o.provider)),
    "openvino": Engine(_open_openvino, lambda b, o: _importable("openvino")),
    "tensorrt": Engine(_open_tensorrt, lambda b, o: _has_plans(b, o) and _importable("tensorrt"), runs_plans=True),
}
BACKENDS = (*ENGINES, "auto")


def _has_cpu_graph(bundle: Bundle) -> bool:
    return ONNXRUNTIME_CPU.name in bundle.manifest.targets


# `auto`'s order: (backend, options, what the bundle must hold beyond the engine being available here)
AUTO_ORDER: tuple[tuple[str, RunOptions, Callable[[Bundle], bool]], ...] = (
    ("tensorrt", RunOptions(), lambda bundle: True),
    ("onnxruntime", RunOptions(provider="cuda"), lambda bundle: True),
    ("onnxruntime", RunOptions(), _has_cpu_graph),
    ("openvino", RunOptions(), lambda bundle: True),
    ("onnxruntime", RunOptions(), lambda bundle: True),
)


def resolve_backend(bundle: Bundle, backend: str, options: RunOptions = RunOptions()) -> tuple[str, RunOptions]:
    """(backend name, options) to run `bundle` with: `backend` itself, or for "auto" the first of AUTO_ORDER
    available here (threads and device carried over)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend, options
    for name, probe, holds in AUTO_ORDER:
        candidate = RunOptions(
            options.threads, probe.provider, options.optimization_level, options.device, options.engine
        )
        if ENGINES[name].available(bundle, candidate) and holds(bundle):
            return name, candidate
    return "onnxruntime", options


def _per_group(backends: list[Backend], groups: list[TimestepGroup]) -> Backend:
    return backends[0] if len(groups) == 1 else TimestepGroupBackend(backends, [g.timesteps for g in groups])


def graph_backend(
    graphs: list[Path], groups: list[TimestepGroup], threads: int | None = None, optimization_level: str = "all"
) -> Backend:
    """The deployed graphs of a target's timestep groups (their paths, in the groups' order), on onnxruntime."""
    return _per_group(
        [OnnxRuntimeBackend(graph, threads, optimization_level=optimization_level) for graph in graphs], groups
    )


def plan_file(onnx_file: str) -> str:
    """The engine built from `onnx_file` sits beside it with the same stem: model_g1.onnx -> model_g1.plan,
    text_encoder/model.onnx -> text_encoder/model.plan."""
    return Path(onnx_file).with_suffix(".plan").as_posix()


def engine_path(bundle: Bundle, graph: str, engine: Path | None = None) -> Path:
    """The engine to run for one of `bundle`'s graphs: `engine` if given (single-graph bundles only), else
    the plan `stepquant build-engine` added to the bundle (listed and hashed in its manifest). A plan that
    build_engine.sh wrote beside the graph is no part of the bundle: name it with --engine."""
    if engine and len(bundle.target(TENSORRT.name).timestep_groups) > 1:
        raise BundleError(
            "--engine names one plan, but this bundle has one graph per timestep group; "
            "build its plans with `stepquant build-engine`"
        )
    if engine:
        if not Path(engine).is_file():
            raise BundleError(f"no TensorRT engine at {engine}")
        return Path(engine)
    plan = plan_file(graph)
    if plan not in bundle.manifest.files:
        raise BundleError(
            f"bundle {bundle.path} holds no TensorRT engine {plan}: run `bash build_engine.sh` in the bundle "
            f"and pass --engine {bundle.path}/{plan}, or add it with `stepquant build-engine --bundle {bundle.path}`"
        )
    return bundle.file(plan)


def quantized_backend(
    bundle: Bundle,
    threads: int | None = None,
    backend: str = "onnxruntime",
    engine: Path | None = None,
    target: str | None = None,
    *,
    provider: str = "cpu",
    device: str = "CPU",
    optimization_level: str | None = None,
) -> Backend:
    """The bundle's quantized graph(s) on `backend` (see the module docstring; "auto" picks one): TensorRT runs
    the tensorrt profile's engines (one per timestep group), the others the graph of the profile they prefer,
    or of the `target` named."""
    name, options = resolve_backend(bundle, backend, RunOptions(threads, provider, optimization_level, device, engine))
    spec = ENGINES[name]
    section = bundle.target(target or bundle.target_for(name, options.provider))
    groups = section.timestep_groups
    if spec.runs_plans:
        tensorrt_version()  # say TensorRT is missing before asking for an engine
        files = [engine_path(bundle, g.graph, engine) for g in groups]
    else:
        files = [bundle.file(g.graph) for g in groups]
    return _per_group([spec.open(f, options, section.onnxruntime_optimization_level) for f in files], groups)


def part_backend(
    bundle: Bundle, graph: str, backend: str = "onnxruntime", options: RunOptions = RunOptions()
) -> Backend:
    """A float graph of the bundle (the FP32 reference denoiser, a text encoder, the VAE decoder) on `backend`:
    on TensorRT its plan when `stepquant build-engine` added one, else onnxruntime on the CPU."""
    name, options = resolve_backend(bundle, backend, options)
    if ENGINES[name].runs_plans:
        tensorrt_version()  # TensorRT asked for and missing: say so, never run elsewhere unasked
        if plan_file(graph) in bundle.manifest.files:
            return TensorRTBackend(bundle.file(plan_file(graph)))
        name, options = "onnxruntime", RunOptions(options.threads)
    return ENGINES[name].open(bundle.file(graph), options, "all")


def reference_backend(
    bundle: Bundle, threads: int | None = None, backend: str = "onnxruntime", options: RunOptions | None = None
) -> Backend:
    """The FP32 graph, parity-checked against the FP torch model at export (no engine is built for it)."""
    name, options = resolve_backend(bundle, backend, options or RunOptions(threads))
    if ENGINES[name].runs_plans:
        raise ValueError(
            "the FP32 reference graph has no TensorRT engine: run it with --backend onnxruntime or openvino"
        )
    return part_backend(bundle, bundle.manifest.reference_graph, name, options)


def bundle_sampler(bundle: Bundle, **requested) -> SamplerConfig:
    """The first stored sampler that has every field a command was given (`scheduler`, `steps`, `eta`,
    `karras_sigmas`; None: not given), with the `guidance_scale` asked for; the default sampler when nothing is
    asked. One line naming the stored samplers when none has them."""
    guidance = requested.pop("guidance_scale", None)
    asked = {name: value for name, value in requested.items() if value is not None}
    for entry in bundle.manifest.samplers:
        if all(getattr(entry.sampler, name) == value for name, value in asked.items()):
            try:
                return SamplerConfig.from_record(entry.sampler).overridden(guidance_scale=guidance)
            except ValueError as err:
                raise BundleError(f"bundle {bundle.path}: {err}") from err
    raise _not_stored(bundle, SamplerConfig.from_record(bundle.manifest.sampler).overridden(**asked))


def _not_stored(bundle: Bundle, config: SamplerConfig) -> SchedulerTableError:
    """The one line for a sampler the bundle does not store, naming those it does."""
    return SchedulerTableError(
        f"bundle {bundle.path} stores no {config.describe()} sampler; it stores "
        f"{', '.join(entry.sampler.spec for entry in bundle.manifest.samplers)}: choose one of "
        "those, or add this one with `stepquant add-sampler`"
    )


def _stored(bundle: Bundle, config: SamplerConfig | None) -> StoredSampler:
    if config is None:
        return bundle.manifest.samplers[0]
    entry = bundle.manifest.stored(config.key)
    if entry is None:
        raise _not_stored(bundle, config)
    return entry


def bundle_table(bundle: Bundle, config: SamplerConfig | None = None) -> SchedulerTable:
    """The scheduler table captured from diffusers at export for the stored sampler `config` (the default one
    when None)."""
    try:
        return SchedulerTable.from_dict(_stored(bundle, config).scheduler_table)
    except SchedulerTableError:
        raise
    except ValueError as err:
        raise BundleError(f"bundle {bundle.path}: {err}") from err


def bundle_corrections(bundle: Bundle, config: SamplerConfig | None = None) -> Corrections | None:
    """The per-timestep correction terms fitted for the stored sampler `config` (the default one when None),
    or None when the bundle has none."""
    if bundle.manifest.correction_method == "none":
        return None
    name = _stored(bundle, config).correction_file
    if not name:
        return None
    corrections = Corrections.load(bundle.file(name))
    if corrections.method != bundle.manifest.correction_method:
        raise CorrectionError(
            f"{name} holds {corrections.method!r} terms but the manifest says {bundle.manifest.correction_method!r}"
        )
    return corrections
