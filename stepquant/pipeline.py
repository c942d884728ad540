"""`export_quantized(config)`: the whole job behind the `export-quantized` command, in five stages that
each return a small result object:

- `prepare`: load the model (and, for conditional models, the conditioning: a class table's rows, prompts through
  the pipeline's text encoder, or a conditioning file); refuse the destination, key or missing TensorRT before any
  work;
- `calibrate_model`: FP sampling trajectories (guided) -> quantize_ + calibration;
- `export_graphs`: per target profile (tensorrt, onnxruntime-cpu) and timestep group, the Q/DQ ONNX and its
  layer-wise parity against the fake-quant model (calibration inputs and the corners of the declared shape
  ranges; the end-to-end error recorded beside it), and the FP ONNX against FP torch;
- `measure_quality`: correction terms, PSNR to FP of the runtime loop on onnxruntime, the preview;
- `write_bundle`: build script, the typed manifest (with the scheduler table), signature; then the rename.
"""

from __future__ import annotations

import copy
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path

import torch
from polygraphy.comparator import IterationResult, RunResults
from polygraphy.json import save_json

from stepquant.bundle.manifest import Manifest, StoredSampler, Target, TextToImage, TimestepGroup
from stepquant.bundle.signing import sign
from stepquant.bundle.targets import TARGETS, TargetProfile
from stepquant.calibrators import collect_calibration_set, distributed
from stepquant.calibrators.calibrate import calibrate_
from stepquant.calibrators.corrections import estimate_corrections
from stepquant.calibrators.data import CALIBRATION_SEED_OFFSET, CalibrationSet
from stepquant.calibrators.ranges import calibrate_ranges
from stepquant.calibrators.timestep_groups import (
    group_scales,
    range_profile,
    set_scales,
    split_by_range_change,
    split_every,
)
from stepquant.errors import StepquantError
from stepquant.eval import save_comparison_grid
from stepquant.eval.memory import peak_rss_mib
from stepquant.export.bundle import check_destination, sign_manifest, staged_directory, write_manifest
from stepquant.export.config import ExportConfig
from stepquant.export.fusion import check_integer_convs
from stepquant.export.layerwise import LayerwiseReport, check_layerwise
from stepquant.export.lint import check_conformance
from stepquant.export.onnx_export import OUTPUT_NAME, export_onnx
from stepquant.export.onnx_files import check_external_data
from stepquant.export.parity import (
    ParityReport,
    check_parity,
    compare_runs,
    compare_to_reference,
    onnxruntime_runner,
    parity_feeds,
    quiet_polygraphy,
    torch_outputs,
)
from stepquant.export.parity_policy import ParityPolicy, parity_policy
from stepquant.export.pipeline_parts import carried_parts, export_pipeline_parts, part_input_shapes
from stepquant.export.precision import export_at_precision
from stepquant.export.samplers import correction_file, quality_record, sampler_quality
from stepquant.export.shapes import CORNERS, ShapeProfile, resize_inputs
from stepquant.export.targets import check_target, for_target
from stepquant.export.tensorrt import build_engines, build_script, tensorrt_version
from stepquant.models import EpsilonModel, LoadedModel, load_model
from stepquant.models.conditioning import load_conditioning
from stepquant.models.denoisers import config_file, sample_shape, spatial_factor
from stepquant.models.device import Placement, device_copy, ieee_float32, place, placed, resolve_placement
from stepquant.models.schedulers import capture_table
from stepquant.models.torch_backend import TorchBackend
from stepquant.quant import quantize_
from stepquant.quant.quantize import round_scales_
from stepquant.runtime.bundle_backends import graph_backend
from stepquant.runtime.corrections import Corrections
from stepquant.runtime.guidance import Conditioning, read_prompts
from stepquant.runtime.sampler import SamplerConfig, sample
from stepquant.runtime.text_to_image import LatentDecoder

FP_TOLERANCE = 1e-5  # median relative error, FP torch vs FP ONNX (no quantizer, so no rounding ties)
# The replay (`stepquant parity`) on another machine or runtime is judged end to end, where one rounding tie
# flipped upstream moves every later quantizer: its tolerance is this many times the worst error the correct
# graph showed at export, and at least the policy's floor (docs/benchmarks/parity.md).
REPLAY_MARGIN = 4.0
MODEL_FILE, FP_MODEL_FILE, PREVIEW_FILE, BUILD_SCRIPT = (
    "model.onnx",
    "model_fp32.onnx",
    "preview.png",
    "build_engine.sh",
)
CLASS_TABLE_FILE = "class_table.safetensors"
CALIBRATION_SHARDS = ".calibration"  # inside the staging directory, removed before the manifest lists its files


class ParityError(StepquantError, RuntimeError):
    """The exported graph does not reproduce the torch model within tolerance."""


@dataclass
class GraphParity:
    """One exported graph's checks: the layer-wise gate, its end-to-end error (information), the fake-quant
    torch outputs saved as the replay's reference and, for the CPU target, the integer kernels found."""

    layerwise: LayerwiseReport
    end_to_end: ParityReport
    reference: RunResults
    kernels: dict | None


@dataclass
class TargetReport:
    """What one target profile's graphs showed at export."""

    graphs: list[str]
    layerwise: list[LayerwiseReport]  # the gate, one report per graph (timestep group)
    end_to_end: ParityReport  # every graph's output against the simulation's, judged at the replay tolerance
    quality: dict  # PSNR to FP with the first sampler (export.samplers.quality_record)
    # onnxruntime-cpu: the integer kernels onnxruntime runs, and the fused graph's distance to the simulation
    integer_kernels: dict | None

    @property
    def parity_passed(self) -> bool:
        return all(report.passed for report in self.layerwise)

    @property
    def psnr_mean_db(self) -> float:
        return self.quality["psnr_to_fp_db_mean"]

    @property
    def psnr_min_db(self) -> float:
        return self.quality["psnr_to_fp_db_min"]

    @property
    def space(self) -> str:
        """What PSNR compares: pixels, latents, or images decoded by the bundle's VAE."""
        return self.quality["space"]


@dataclass
class ExportReport:
    bundle: Path
    preview: Path  # FP samples beside the first target's samples
    fp_parity: ParityReport
    targets: dict[str, TargetReport]
    eval_samples: int
    quantized_layers: list[str]
    calibration_seconds: float  # model load, FP trajectories and range calibration
    seconds: float
    samplers: tuple[StoredSampler, ...] = ()  # each stored sampler, with its PSNR to FP on the first target

    @property
    def primary(self) -> TargetReport:
        """The first target asked for (the one corrections are estimated on)."""
        return next(iter(self.targets.values()))

    @property
    def parity_passed(self) -> bool:
        return all(target.parity_passed for target in self.targets.values())

    @property
    def end_to_end(self) -> ParityReport:
        return self.primary.end_to_end

    @property
    def psnr_mean_db(self) -> float:
        return self.primary.psnr_mean_db

    @property
    def graphs(self) -> list[str]:
        return self.primary.graphs


def _versions() -> dict:
    packages = ("stepquant", "torch", "diffusers", "onnx", "onnxruntime", "polygraphy")
    return {"python": platform.python_version(), **{p: version(p) for p in packages}}


def _parity_subset(
    calib: CalibrationSet,
    count: int,
    batch: int,
    timesteps: list[float],
    shapes: ShapeProfile | None = None,
    conditions=(),
) -> list:
    """Feeds at `count` of `timesteps` as calibrated (batch `batch`, not the traced 2, so the batch axis is
    exercised); where `shapes` declares dynamic sizes, also the first and middle timestep at its corners
    (min sizes at batch 2, max sizes at `batch`), resized from calibration inputs.

    Corners avoid batch 1 and t ~ 0, where Q/DQ rounding ties flip on float noise alone: at batch 1
    onnxruntime's CPU convolutions sum in another order (demo model, t = 750: median 2.7e-3 between
    onnxruntime's own batch-1 and batch-4 outputs of one input), so such checks would measure onnxruntime's
    kernels, not the export."""
    count = min(count, len(timesteps))
    picks = [timesteps[round(i * (len(timesteps) - 1) / max(1, count - 1))] for i in range(count)]
    parts = [calib.at_timestep(t, batch) for t in dict.fromkeys(picks)]
    feeds = parity_feeds(
        torch.cat([p.samples for p in parts]),
        torch.cat([p.timesteps for p in parts]),
        {k: torch.cat([p.conditions[k] for p in parts]) for k in parts[0].conditions},
    )
    if shapes is None or not shapes.dynamic_sizes:
        return feeds
    recorded = {t: calib.at_timestep(t, len(calib)) for t in (timesteps[0], timesteps[len(timesteps) // 2])}
    for corner in CORNERS:
        size = {dim: getattr(getattr(shapes, dim), corner) for dim in ("height", "width")}
        rows = min(max(2 if corner == "min" else batch, shapes.batch.min), shapes.batch.max)
        sequence = getattr(shapes.sequence, corner) if shapes.sequence is not None else None
        for t, part in recorded.items():
            samples, cond = resize_inputs(
                part.samples, part.conditions, conditions, rows, size["height"], size["width"], sequence
            )
            feeds += parity_feeds(samples, torch.full((rows,), t), cond)
    return feeds


@dataclass
class _Graph:
    """One exported Q/DQ graph and the sampler timesteps it serves ("all" for a single graph)."""

    file: str
    timesteps: list[float] | str
    parity_dir: str
    calibrated: list[float]  # the calibration timesteps inside this group


def _graphs(
    config: ExportConfig, calib: CalibrationSet, q_model, scheduler_config: dict
) -> tuple[list[_Graph], list | None]:
    """The graphs to export and, with timestep groups, each group's activation scales."""
    calibrated = calib.unique_timesteps()
    if not config.calibration.grouped:
        return [_Graph(MODEL_FILE, "all", "parity", calibrated)], None
    profile_timesteps, profile = range_profile(q_model, calib)
    groups = (
        split_every(len(profile_timesteps), config.calibration.steps_per_group)
        if config.calibration.steps_per_group
        else split_by_range_change(profile, config.calibration.timestep_groups)
    )
    scales = group_scales(q_model, profile, groups)
    # every stored sampler's timesteps join the group of the nearest calibrated timestep
    members: list[list[float]] = [[] for _ in groups]
    timesteps = dict.fromkeys(t for s in config.samplers for t in capture_table(s, scheduler_config).timesteps.tolist())
    for t in timesteps:
        nearest = min(range(len(profile_timesteps)), key=lambda i: abs(profile_timesteps[i] - t))
        members[next(g for g, rows in enumerate(groups) if nearest in rows)].append(float(t))
    graphs = [
        _Graph(f"model_g{g}.onnx", members[g], f"parity/g{g}", [profile_timesteps[i] for i in rows])
        for g, rows in enumerate(groups)
    ]
    return graphs, scales


def _export_graph(
    q_model,
    path: Path,
    shape,
    config: ExportConfig,
    feeds: list,
    target: TargetProfile,
    shapes: ShapeProfile,
    device: torch.device,
) -> GraphParity:
    """Export one Q/DQ graph (traced on the CPU), check it for its target (TensorRT's Q/DQ rules, or
    onnxruntime's integer kernels) and against the fake-quant model run on `device`, layer by layer; stop on a
    failure unless allowed."""
    export_at_precision(q_model, path, shape, config.precision, config.quant.opset, shapes)
    with placed(q_model, device):
        return _check_graph(q_model, path, config, feeds, target)


def _check_graph(q_model, path: Path, config: ExportConfig, feeds: list, target: TargetProfile) -> GraphParity:
    reference = torch_outputs(q_model, feeds)  # the simulation's outputs: the replay's reference, and the fused graph's
    kernels = None
    if target.tensorrt_rules:
        check_conformance(path)  # TensorRT's Q/DQ rules, before any user runs trtexec
    if target.integer_kernels:  # what onnxruntime runs fused: integer kernels, and their distance to the simulation
        fused = compare_to_reference(onnxruntime_runner(path, "all"), feeds, reference)
        kernels = {
            "integer_kernels": check_integer_convs(path, q_model),
            "fused_kernels_median_reldiff": {f"{t.timestep:g}": t.median_reldiff for t in fused.timesteps},
        }
    layerwise, outputs = check_layerwise(
        q_model, path, feeds, parity_policy(target.name, config.quant.format, config.precision)
    )
    if not layerwise.passed and config.checks.require_parity:
        raise ParityError(
            f"layer-wise parity failed for {path.name} against the fake-quant model: {layerwise.summary()} "
            "(pass --allow-parity-failure to keep the bundle, recorded as failed)"
        )
    graph_runs = [IterationResult({OUTPUT_NAME: output}, runner_name="onnxruntime") for output in outputs]
    end_to_end = compare_runs(RunResults([("onnxruntime", graph_runs), reference[0]]), feeds)
    return GraphParity(layerwise, end_to_end, reference, kernels)


def replay_tolerance(policy: ParityPolicy, end_to_end: list[ParityReport]) -> float:
    """The end-to-end tolerance `stepquant parity` replays with: REPLAY_MARGIN times the worst median error
    the correct graphs showed at export, at least the policy's floor."""
    return max(policy.replay_floor, REPLAY_MARGIN * max(report.worst_median_reldiff for report in end_to_end))


@dataclass
class Prepared:
    """Stage 1, before any work is staged: the model, its conditioning and the graphs' shape ranges."""

    loaded: LoadedModel
    fp_model: EpsilonModel  # CPU float32: exported
    fp_reference: EpsilonModel  # the same on --device in --dtype: trajectories, calibration targets, FP samples
    placement: Placement
    shape: tuple[int, int, int]
    conditioning: Conditioning | None
    shapes: ShapeProfile
    latent: bool  # samples latents for a VAE (LoadedModel.latent)
    protected: tuple[Path, ...]  # the model's own directory, never to be replaced
    text_to_image: bool = False  # a pipeline whose tokenizer, text encoder and VAE decoder the bundle carries


@dataclass
class Calibrated:
    """Stage 2: the fake-quant model with its calibrated scales, the data they came from, and the graphs to export."""

    q_model: EpsilonModel
    models: dict[str, EpsilonModel]  # per target: q_model itself (tensorrt) or its retargeted copy
    layer_names: list[str]
    calib: CalibrationSet
    calib_seeds: list[int]  # this process's (every seed without torchrun)
    calib_conditioning: Conditioning | None  # the rows of this process's seeds (their positions among all seeds)
    summary: dict  # the manifest's calibration section
    graphs: list[_Graph]
    scales: list | None  # per timestep group, when there are groups
    seconds: float


@dataclass
class Exported:
    """Stage 3: the FP graph's parity, and per target each graph's timestep group and checks."""

    fp_parity: ParityReport
    graphs: dict[str, list[tuple[TimestepGroup, GraphParity]]]
    parts: TextToImage | None = (
        None  # a whole pipeline's tokenizers, text encoders and VAE decoder, written and checked
    )


@dataclass
class Measured:
    """Stage 4: the stored samplers (tables and correction terms), the first one's terms, and each target's
    quality (with that sampler) and parity summary."""

    samplers: tuple[StoredSampler, ...]
    corrections: Corrections | None
    reports: dict[str, TargetReport]


def prepare(config: ExportConfig) -> Prepared:
    """Load the model and its conditioning, and refuse what would fail later (destination, key, TensorRT)."""
    model_path = Path(config.model).expanduser()
    protected = (model_path,) if model_path.exists() else ()
    check_destination(config.out, config.overwrite, protected)  # before any work
    placement = resolve_placement(config.device, config.dtype)
    if distributed.init_from_env(placement.device) > 1:
        if config.calibration.grouped:
            raise ValueError(
                "--timestep-groups / --steps-per-group profile ranges per timestep in one process: run them "
                "without torchrun"
            )
        placement = Placement(distributed.rank_device(placement.device), placement.dtype)
    loaded = load_model(config.model)
    shape = config.shapes.working_shape(sample_shape(loaded.denoiser), spatial_factor(loaded.denoiser))
    fp_model = EpsilonModel(loaded.denoiser)
    fp_reference = (
        fp_model
        if placement.is_default
        else EpsilonModel(device_copy(loaded.denoiser, placement.device, placement.dtype))
    )
    if config.engine:
        tensorrt_version()  # fail before any work when the engine cannot be built here
    if config.sign_key is not None:
        sign(b"", config.sign_key)  # an unreadable key fails now, not after calibration
    parts = carried_parts(
        loaded.pipeline, fp_model.condition_names
    )  # a pipeline missing a part fails here, not at the end
    asked = config.conditioning
    conditioning = load_conditioning(fp_model, loaded, asked.prompts_file, asked.file, shape, asked.classes)
    prediction = loaded.scheduler_config.get("prediction_type", "epsilon")
    if prediction != "epsilon" and (config.correction.enabled or config.calibration.calibrator == "mixed-order"):
        what = f"--correction {config.correction.method}" if config.correction.enabled else "--calibrator mixed-order"
        raise ValueError(
            f"{what} works on noise estimates, and this model predicts {prediction!r}: use it with an "
            "epsilon-prediction model (the samplers themselves handle every prediction type)"
        )
    if config.correction.per_branch and conditioning is None:
        raise ValueError(
            f"--correction-per-branch fits terms to the two branches of guided sampling, and {loaded.source} "
            "is unconditional: drop --correction-per-branch"
        )
    shapes = config.shapes.resolved(
        shape, None if conditioning is None else conditioning.sequence_length(fp_model.conditions)
    )
    return Prepared(
        loaded, fp_model, fp_reference, placement, shape, conditioning, shapes, loaded.latent, protected, parts
    )


def calibrate_model(config: ExportConfig, prepared: Prepared, start: float, shards: Path) -> Calibrated:
    """Quantize a copy of the model and calibrate it on the FP model's own sampling trajectories, whose inputs
    are kept on disk in `shards` (a directory the caller removes)."""
    loaded = prepared.loaded
    q_model = EpsilonModel(copy.deepcopy(loaded.denoiser))
    layer_names = quantize_(q_model, config.quant)
    for target in config.targets:
        check_target(q_model, target)
    place(q_model, prepared.placement.device)  # float32 whatever the reference's --dtype
    positions = distributed.shard(config.calibration.samples, config.calibration.batch)
    calib_seeds = [CALIBRATION_SEED_OFFSET + config.seed + position for position in positions]
    conditioning = None if prepared.conditioning is None else prepared.conditioning.at(positions)
    calib = collect_calibration_set(
        TorchBackend(prepared.fp_reference),
        loaded.scheduler_config,
        calib_seeds,
        prepared.shape,
        config.sampler,
        config.calibration.steps or config.sampler.steps,
        config.progress,
        conditioning,
        config.calibration.batch,
        shards,
    )
    summary = calibrate_(
        prepared.fp_reference,
        q_model,
        calib,
        config.calibration.calibrator,
        loaded.scheduler_config,
        config.sampler,
        config.calibration.percentile,
        config.calibration.reconstruction,
        config.progress,
    )
    graphs, scales = _graphs(config, calib, q_model, loaded.scheduler_config)
    place(q_model, torch.device("cpu"))  # graphs are traced and checked on the CPU
    models = {target: for_target(q_model, target, prepared.shapes.batch.opt) for target in config.targets}
    for model in models.values():  # same scales; a profile's extra output quantizers get their ranges here
        calibrate_ranges(model, calib, progress=False, only_uncalibrated=True)
    seconds = time.perf_counter() - start
    # the process's peak resident memory so far: in a fresh process, the peak of loading and calibrating
    summary["peak_rss_mib"] = round(peak_rss_mib(), 1)
    if prepared.placement.device.type == "cuda":
        summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(prepared.placement.device) / 2**30, 2)
    summary.update(
        percentile=config.calibration.percentile,
        reconstruction=asdict(config.calibration.reconstruction) if summary.get("blocks") else None,
        trajectories=config.calibration.samples,
        inputs=int(distributed.reduce_sum(torch.tensor(len(calib)))),
        timesteps=calib.unique_timesteps(),
        processes=distributed.world_size(),
        seed=config.seed,
        seconds=round(seconds, 2),
        **prepared.placement.describe(),
    )
    return Calibrated(q_model, models, layer_names, calib, calib_seeds, conditioning, summary, graphs, scales, seconds)


def export_graphs(config: ExportConfig, prepared: Prepared, calibrated: Calibrated, staging: Path) -> Exported:
    """The FP graph (checked end to end against FP torch), then per timestep group and target the Q/DQ graph,
    checked layer by layer, with its parity data saved for the replay; a whole pipeline's other parts."""
    fp_model, shape, shapes, calib = prepared.fp_model, prepared.shape, prepared.shapes, calibrated.calib
    q_model, scales = calibrated.q_model, calibrated.scales
    export_onnx(fp_model, staging / FP_MODEL_FILE, shape, profile=shapes)
    all_feeds = _parity_subset(
        calib,
        config.checks.parity_timesteps,
        config.checks.parity_batch,
        calib.unique_timesteps(),
        shapes,
        fp_model.conditions,
    )
    device = prepared.placement.device  # parity's torch side runs there, in float32
    fp32 = prepared.fp_reference if prepared.placement.dtype == torch.float32 else fp_model
    with placed(fp32, device):
        fp_parity, _ = check_parity(fp32, staging / FP_MODEL_FILE, all_feeds, FP_TOLERANCE)
    if not fp_parity.passed:  # the FP graph must match: nothing quantized can explain a difference
        raise ParityError(
            f"parity failed for FP torch vs FP ONNX: worst median relative error "
            f"{fp_parity.worst_median_reldiff:.3g} > {fp_parity.tolerance_median_rel:g}"
        )
    models = calibrated.models
    exported: dict[str, list[tuple[TimestepGroup, GraphParity]]] = {target: [] for target in config.targets}
    for g, graph in enumerate(calibrated.graphs):
        if scales is not None:
            set_scales(q_model, scales[g])
        if config.precision == "fp16":
            round_scales_(q_model, torch.float16)
        feeds = _parity_subset(
            calib,
            config.checks.parity_timesteps,
            config.checks.parity_batch,
            graph.calibrated,
            shapes,
            fp_model.conditions,
        )
        for target, model in models.items():
            if model is not q_model and scales is not None:  # this group's scales (strict=False: the
                model.load_state_dict(q_model.state_dict(), strict=False)  # profile adds or drops quantizers)
            profile = TARGETS[target]
            file, parity_dir = profile.graph_file(graph.file), profile.parity_dir(graph.parity_dir)
            parity = _export_graph(model, staging / file, shape, config, feeds, profile, shapes, device)
            (staging / parity_dir).mkdir(parents=True)
            with quiet_polygraphy():
                save_json(feeds, staging / parity_dir / "inputs.json", description="parity inputs")
                parity.reference.save(str(staging / parity_dir / "reference_outputs.json"))  # torch outputs
            exported[target].append((TimestepGroup(file, graph.timesteps, parity_dir), parity))
    parts = (
        export_pipeline_parts(
            prepared.loaded.pipeline,
            staging,
            shape,
            read_prompts(config.conditioning.prompts_file) if config.conditioning.prompts_file else [],
            fp_model.condition_names,
            config.precision,
        )
        if prepared.text_to_image
        else None
    )
    return Exported(fp_parity, exported, parts)


def estimate_rank_corrections(
    config: ExportConfig,
    prepared: Prepared,
    calibrated: Calibrated,
    graphs: list[tuple[Path, TimestepGroup]],
    sampler: SamplerConfig,
) -> Corrections:
    """The correction terms of the deployed `graphs` (paths in rank 0's staging directory, read by every rank)
    for `sampler`, each process along its own calibration trajectories, their statistics summed over the processes."""
    deployed = graph_backend(
        [path for path, _ in graphs],
        [group for _, group in graphs],
        optimization_level=TARGETS[config.targets[0]].optimization_level,
    )
    return estimate_corrections(
        config.correction.method,
        TorchBackend(prepared.fp_reference),
        deployed,
        prepared.loaded.scheduler_config,
        calibrated.calib_seeds,
        prepared.shape,
        sampler,
        config.progress,
        calibrated.calib_conditioning,
        per_branch=config.correction.per_branch,
    )


def measure_quality(
    config: ExportConfig, prepared: Prepared, calibrated: Calibrated, exported: Exported, staging: Path
) -> Measured:
    """Correction terms (on the first target's graphs), then every target's samples against FP torch's from the
    same seeds, run by the runtime loop on onnxruntime; the preview grid; each target's report."""
    loaded, shape, latent = prepared.loaded, prepared.shape, prepared.latent
    deployed = {
        target: graph_backend(
            [staging / group.graph for group, _ in graphs],
            [group for group, _ in graphs],
            optimization_level=TARGETS[target].optimization_level,
        )
        for target, graphs in exported.graphs.items()
    }
    stored, terms, tables = [], [], [capture_table(sampler, loaded.scheduler_config) for sampler in config.samplers]
    first = [(staging / group.graph, group) for group, _ in exported.graphs[config.targets[0]]]
    for index, (sampler, table) in enumerate(zip(config.samplers, tables)):
        file = None
        if config.correction.enabled:  # estimated on the first target's graphs, along calibration trajectories
            terms.append(estimate_rank_corrections(config, prepared, calibrated, distributed.broadcast(first), sampler))
            file = correction_file(index)
            terms[-1].save(staging / file)
        stored.append(StoredSampler(sampler.to_record(), table.to_dict(), file))
    corrections = terms[0] if terms else None
    eval_seeds = range(config.seed, config.seed + config.checks.eval_samples)
    table = tables[0]
    fp_samples = sample(
        TorchBackend(prepared.fp_reference),
        table,
        eval_seeds,
        shape,
        config.sampler,
        progress=config.progress,
        desc="FP samples",
        conditioning=prepared.conditioning,
        clip=not latent,
    ).samples
    decode = _decoder(exported.parts, staging)
    if decode is not None:  # a whole pipeline: quality and preview on decoded images, as a user sees them
        fp_samples = decode(fp_samples)
    reports: dict[str, TargetReport] = {}
    for target, backend in deployed.items():
        q_samples = sample(
            backend,
            table,
            eval_seeds,
            shape,
            config.sampler,
            progress=config.progress,
            desc=f"{target} graph samples (onnxruntime)",
            corrections=corrections,
            conditioning=prepared.conditioning,
            clip=not latent,
        ).samples
        if decode is not None:
            q_samples = decode(q_samples)
        if not reports:
            save_comparison_grid(fp_samples[:32], q_samples[:32], staging / PREVIEW_FILE)
        parities = [parity for _, parity in exported.graphs[target]]
        kernels = (
            None
            if parities[0].kernels is None
            else {
                "integer_kernels": parities[0].kernels["integer_kernels"],  # every group's graph has the same structure
                "fused_kernels_median_reldiff": {
                    t: v for parity in parities for t, v in parity.kernels["fused_kernels_median_reldiff"].items()
                },
            }
        )
        end_to_end = [parity.end_to_end for parity in parities]
        tolerance = replay_tolerance(parities[0].layerwise.policy, end_to_end)
        reports[target] = TargetReport(
            graphs=[group.graph for group, _ in exported.graphs[target]],
            layerwise=[parity.layerwise for parity in parities],
            end_to_end=ParityReport(
                float("inf"), end_to_end[0].error_quantile, [t for report in end_to_end for t in report.timesteps]
            ).judged(tolerance),
            quality=quality_record(q_samples, fp_samples, eval_seeds, latent=latent, decoded=decode is not None),
            integer_kernels=kernels,
        )
    stored[0] = replace(stored[0], quality=reports[config.targets[0]].quality)
    for index in range(1, len(stored)):  # the other stored samplers, on the first target's graphs
        sampler = config.samplers[index]
        stored[index] = replace(
            stored[index],
            quality=sampler_quality(
                TorchBackend(prepared.fp_reference),
                deployed[config.targets[0]],
                tables[index],
                sampler,
                eval_seeds,
                shape,
                latent=latent,
                conditioning=prepared.conditioning,
                corrections=terms[index] if terms else None,
                decode=decode,
                progress=config.progress,
            ),
        )
    return Measured(tuple(stored), corrections, reports)


def _decoder(parts: TextToImage | None, staging: Path):
    """Latents -> images in [-1, 1] through the staged VAE decoder graph, batch by batch (None without one)."""
    if parts is None:
        return None
    return LatentDecoder(staging / parts.vae_decoder, parts.scaling_factor, parts.shift_factor).in_batches


def _target_section(target: str, report: TargetReport, groups: list[TimestepGroup]) -> Target:
    return Target(
        timestep_groups=groups,
        parity={
            "gate": "layer-wise",
            "passed": report.parity_passed,
            "layerwise": [layerwise.to_dict() for layerwise in report.layerwise],
            "end_to_end": report.end_to_end.to_dict(),
        },
        onnxruntime_optimization_level=TARGETS[target].optimization_level,
        parity_optimization_level=report.layerwise[0].policy.optimization_level,
        details={
            "quality": report.quality,
            **(
                {"lint": {"rules": "tensorrt explicit quantization", "findings": 0}}
                if TARGETS[target].tensorrt_rules
                else {}
            ),
            **(report.integer_kernels or {}),
        },
    )


def write_bundle(
    config: ExportConfig,
    prepared: Prepared,
    calibrated: Calibrated,
    exported: Exported,
    measured: Measured,
    staging: Path,
) -> None:
    """build_engine.sh (one engine per graph, a whole pipeline's parts included; the engines too, with --engine),
    then the manifest, signed with --sign-key."""
    fp_model, conditioning = prepared.fp_model, prepared.conditioning
    parts = exported.parts
    trt_graphs = [
        group.graph
        for target, graphs in exported.graphs.items()
        if TARGETS[target].tensorrt_rules
        for group, _ in graphs
    ]
    engine = {}
    if trt_graphs:
        input_shapes = prepared.shapes.input_shapes(prepared.shape[0], fp_model.conditions)
        graphs = {graph: input_shapes for graph in trt_graphs} | (
            part_input_shapes(parts, prepared.shapes, prepared.shape[0]) if parts else {}
        )
        (staging / BUILD_SCRIPT).write_text(build_script(graphs))
        (staging / BUILD_SCRIPT).chmod(0o755)
        engine = {"build_script": BUILD_SCRIPT, "input_shapes": input_shapes}
        if config.engine:
            engine.update(build_engines(staging, graphs))
    for graph in [FP_MODEL_FILE, *(group.graph for graphs in exported.graphs.values() for group, _ in graphs)]:
        check_external_data(staging / graph)  # a large graph's data file sits beside it, and is listed below
    corrections = measured.corrections
    # class-conditional models travel with their class table, so `sample --bundle --classes` needs no model
    asked = config.conditioning
    class_table = (
        prepared.loaded.class_table
        if conditioning is not None and asked.prompts_file is None and asked.file is None
        else None
    )
    if class_table is not None:
        shutil.copyfile(class_table, staging / CLASS_TABLE_FILE)
    denoiser_config, text = config_file(prepared.loaded.denoiser)  # what a diffusers drop-in reports as its .config
    (staging / denoiser_config).parent.mkdir(exist_ok=True)
    (staging / denoiser_config).write_text(text)
    source = (
        (f"classes {', '.join(map(str, asked.classes))}" if asked.classes else "every class")
        if class_table
        else str(asked.prompts_file or asked.file)
    )
    write_manifest(
        staging,
        Manifest(
            source_model=prepared.loaded.source,
            sample_shape=prepared.shape,
            conditions=fp_model.conditions,
            shape_profile=prepared.shapes.to_dict(),
            noise_schedule=prepared.loaded.scheduler_config,
            samplers=measured.samplers,
            targets={
                target: _target_section(target, report, [group for group, _ in exported.graphs[target]])
                for target, report in measured.reports.items()
            },
            reference_graph=FP_MODEL_FILE,
            correction_method=config.correction.method,
            engine=engine,
            sample_space="latent" if prepared.latent else "pixel",
            class_table=CLASS_TABLE_FILE if class_table else None,
            text_to_image=parts,
            denoiser_config=denoiser_config,
            info={
                "conditioning": None
                if conditioning is None
                else {
                    "source": source,
                    "prompts": len(conditioning),
                    "classes": list(asked.classes) if class_table and asked.classes else None,
                    "calibration_copies": "unconditional and conditional"
                    if config.sampler.guidance_scale != 1.0
                    else "conditional",
                },
                "quantization": {
                    **config.quant.to_dict(),
                    "targets": list(config.targets),
                    "precision": config.precision,
                    "layers": calibrated.layer_names,
                },
                "calibration": calibrated.summary,
                "correction_timesteps": corrections.timesteps.tolist() if corrections else None,
                "correction_fit": ("per branch" if config.correction.per_branch else "guided estimate")
                if corrections
                else None,
                "parity": {"fp": exported.fp_parity.to_dict()},
                "versions": _versions(),
            },
        ),
    )
    if config.sign_key is not None:
        sign_manifest(staging, config.sign_key)


@ieee_float32()  # float32 on a GPU means float32: calibration and parity without TF32
def export_quantized(config: ExportConfig) -> ExportReport | None:
    """prepare -> calibrate_model -> export_graphs -> measure_quality -> write_bundle, staged beside --out and
    renamed there only when every stage succeeded. Under torchrun every process calibrates its share of the
    seeds; rank 0 alone exports and writes, the others return None once their part is reduced."""
    start = time.perf_counter()
    prepared = prepare(config)
    if not distributed.is_main():  # its calibration inputs in a temporary directory of its own, removed at the end
        config = replace(config, progress=False)
        with tempfile.TemporaryDirectory(prefix="stepquant-calibration-") as shards:
            calibrated = calibrate_model(config, prepared, start, Path(shards))
            if config.correction.enabled:
                for sampler in config.samplers:
                    estimate_rank_corrections(config, prepared, calibrated, distributed.broadcast(None), sampler)
        return None
    with staged_directory(config.out, config.overwrite, prepared.protected) as staging:
        calibrated = calibrate_model(config, prepared, start, staging / CALIBRATION_SHARDS)
        exported = export_graphs(config, prepared, calibrated, staging)
        shutil.rmtree(staging / CALIBRATION_SHARDS)  # no part of the bundle
        measured = measure_quality(config, prepared, calibrated, exported, staging)
        write_bundle(config, prepared, calibrated, exported, measured, staging)
    return ExportReport(
        bundle=Path(config.out),
        preview=Path(config.out) / PREVIEW_FILE,
        fp_parity=exported.fp_parity,
        targets=measured.reports,
        eval_samples=config.checks.eval_samples,
        quantized_layers=calibrated.layer_names,
        calibration_seconds=calibrated.seconds,
        seconds=time.perf_counter() - start,
        samplers=measured.samplers,
    )
