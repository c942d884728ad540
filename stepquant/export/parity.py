"""End-to-end parity between a torch model and its exported graph, measured with Polygraphy's Comparator
(torch on --device against Polygraphy's onnxruntime runner, or TensorRT's on a GPU box): the FP graph's gate,
a quantized graph's reported error, and the replay of a bundle's saved inputs on another machine.
A quantized graph's gate at export is layer-wise (export/layerwise.py)."""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.comparator import Comparator, CompareFunc, RunResults
from polygraphy.exception import PolygraphyException
from polygraphy.json import load_json
from polygraphy.logger import G_LOGGER
from torch import nn

from stepquant.bundle import Bundle, BundleError
from stepquant.export.onnx_export import INPUT_NAMES, OUTPUT_NAME
from stepquant.export.shapes import ShapeProfile
from stepquant.runtime.onnxruntime_backend import graph_optimization_level

ERROR_QUANTILE = 0.99

try:  # Polygraphy >= 0.53 deprecates CompareFunc.simple in favour of this class
    from polygraphy.comparator import SimpleCompareFunc as _simple_compare
except ImportError:  # older Polygraphy, e.g. the one shipped with JetPack
    _simple_compare = CompareFunc.simple


class TorchRunner(BaseRunner):
    """A Polygraphy runner for a torch module with the (sample, timestep, *conditions) -> eps signature, fed
    CPU tensors (an `EpsilonModel` runs them on its own device; Polygraphy's own PytRunner moves inputs to CUDA)."""

    def __init__(self, model: nn.Module, name: str = "torch") -> None:
        super().__init__(name=name, prefix="torch-cpu-runner")
        self._model = model
        self._names = (*INPUT_NAMES, *getattr(model, "condition_names", ()))

    def activate_impl(self) -> None:
        self._model.eval()

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        metadata = TensorMetadata()
        metadata.add(INPUT_NAMES[0], np.float32, shape=(-1, -1, -1, -1))
        metadata.add(INPUT_NAMES[1], np.float32, shape=(-1,))
        for condition in getattr(self._model, "conditions", ()):
            metadata.add(condition.name, np.float32, shape=(-1,) * (1 + len(condition.shape)))
        return metadata

    def infer_impl(self, feed_dict):
        inputs = [torch.from_numpy(np.asarray(feed_dict[name], dtype=np.float32)) for name in self._names]
        start = time.perf_counter()
        with torch.inference_mode():
            output = self._model(*inputs)
        self.inference_time = time.perf_counter() - start
        return OrderedDict({OUTPUT_NAME: output.numpy()})

    def deactivate_impl(self) -> None:
        pass


@dataclass
class TimestepParity:
    timestep: float
    shape: list[int]  # of the sample input (batch, channels, height, width)
    median_reldiff: float
    quantile_reldiff: float
    max_absdiff: float
    passed: bool


@dataclass
class ParityReport:
    """Per-timestep end-to-end error statistics of a graph against its reference; `passed` when every
    median is within `tolerance_median_rel`."""

    tolerance_median_rel: float
    error_quantile: float
    timesteps: list[TimestepParity]

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.timesteps)

    @property
    def worst_median_reldiff(self) -> float:
        return max(t.median_reldiff for t in self.timesteps)

    def judged(self, tolerance: float) -> ParityReport:
        """The same figures judged at `tolerance`."""
        return ParityReport(
            tolerance, self.error_quantile, [replace(t, passed=t.median_reldiff <= tolerance) for t in self.timesteps]
        )

    def to_dict(self) -> dict:
        return {
            "tolerance_median_rel": self.tolerance_median_rel,
            "error_quantile": self.error_quantile,
            "passed": self.passed,
            "timesteps": [asdict(t) for t in self.timesteps],
        }


@contextlib.contextmanager
def quiet_polygraphy():
    """Keep Polygraphy's info logging off the CLI's output."""
    with G_LOGGER.verbosity(G_LOGGER.ERROR), contextlib.redirect_stdout(None):
        yield


def parity_feeds(
    samples: torch.Tensor, timesteps: torch.Tensor, conditions: dict[str, torch.Tensor] | None = None
) -> list[OrderedDict]:
    """One Polygraphy feed dict per distinct timestep (the format `polygraphy run --load-inputs` reads),
    holding the sample, the timestep and the condition inputs, in graph input order."""
    tensors = {INPUT_NAMES[0]: samples, INPUT_NAMES[1]: timesteps, **(conditions or {})}
    feeds = []
    for t in sorted({float(v) for v in timesteps}, reverse=True):
        index = timesteps == t
        feeds.append(OrderedDict((name, tensor[index].numpy().astype(np.float32)) for name, tensor in tensors.items()))
    return feeds


def compare_runs(results: RunResults, feeds: list[OrderedDict], tolerance: float = float("inf")) -> ParityReport:
    """Compare the first runner of `results` against the second, the reference (Polygraphy divides by the
    second output for relative errors), feed by feed, judging the median relative error against `tolerance`."""
    compare = _simple_compare(
        check_error_stat="median", rtol={OUTPUT_NAME: tolerance}, atol={OUTPUT_NAME: 0.0}, error_quantile=ERROR_QUANTILE
    )
    with quiet_polygraphy():
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    result = accuracy if hasattr(accuracy, "values") else accuracy[0]  # Polygraphy >= 0.53 returns a list
    per_iteration = next(iter(result.values()))
    report = ParityReport(tolerance, ERROR_QUANTILE, [])
    for feed, outputs, candidate, reference in zip(feeds, per_iteration, results[0][1], results[1][1]):
        stats = outputs[OUTPUT_NAME]
        expected = np.abs(np.asarray(reference[OUTPUT_NAME])).astype(np.float64)
        reldiff = np.abs(np.asarray(candidate[OUTPUT_NAME]) - np.asarray(reference[OUTPUT_NAME])) / np.maximum(
            expected, np.finfo(np.float32).tiny
        )
        report.timesteps.append(
            TimestepParity(
                timestep=float(feed[INPUT_NAMES[1]][0]),
                shape=list(np.shape(feed[INPUT_NAMES[0]])),
                median_reldiff=float(stats.median_reldiff),
                quantile_reldiff=float(np.quantile(reldiff, ERROR_QUANTILE)),
                max_absdiff=float(stats.max_absdiff),
                passed=bool(stats.median_reldiff <= tolerance),
            )
        )
    return report


def onnxruntime_session(model: Path | bytes, optimization_level: str | None = None, name: str | None = None):
    """An onnxruntime session on the CPU provider for a graph's path or bytes (`name` says which graph in
    errors), at a graph optimisation level that can be lowered ('disable' runs the Q/DQ nodes as written);
    a graph onnxruntime refuses ends in one line."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # its notes on initializers it drops are not ours to show
    if optimization_level is not None:
        options.graph_optimization_level = graph_optimization_level(optimization_level)
    try:
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as err:  # onnxruntime's own errors (its exception types are not exported)
        label = name or (model.name if isinstance(model, Path) else "the graph")
        raise ValueError(f"onnxruntime cannot load {label}: {' '.join(str(err).split())[:300]}") from err


def onnxruntime_runner(onnx_path: Path, optimization_level: str | None = None) -> OnnxrtRunner:
    """Polygraphy's onnxruntime runner on `onnxruntime_session`."""
    return OnnxrtRunner(lambda: onnxruntime_session(onnx_path, optimization_level), name="onnxruntime")


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    feeds: list[OrderedDict],
    tolerance: float = float("inf"),
    optimization_level: str | None = None,
) -> tuple[ParityReport, RunResults]:
    """Run onnxruntime and torch (the reference) on every feed; returns the report and the results."""
    with quiet_polygraphy():
        results = Comparator.run(
            [onnxruntime_runner(onnx_path, optimization_level), TorchRunner(model)], data_loader=feeds
        )
    return compare_runs(results, feeds, tolerance), results


def torch_outputs(model: nn.Module, feeds: list[OrderedDict]) -> RunResults:
    """The torch model's outputs on every feed, as Polygraphy results (the reference a bundle saves)."""
    with quiet_polygraphy():
        return Comparator.run([TorchRunner(model)], data_loader=feeds)


def compare_to_reference(
    runner: BaseRunner, feeds: list[OrderedDict], reference: RunResults, tolerance: float = float("inf")
) -> ParityReport:
    """Run `runner` on every feed and compare its outputs with `reference`'s (one runner's, already run)."""
    with quiet_polygraphy():
        results = Comparator.run([runner], data_loader=feeds)
    return compare_runs(RunResults([results[0], reference[0]]), feeds, tolerance)


def check_feeds(feeds: object, bundle: Bundle) -> list[OrderedDict]:
    """Refuse parity inputs that the bundle's graphs cannot take: not a list of feed dicts, other input
    names, or shapes outside the declared ranges."""
    channels = bundle.manifest.sample_shape[0]
    profile = ShapeProfile.from_dict(bundle.manifest.shape_profile)
    names = [*INPUT_NAMES, *(c.name for c in bundle.manifest.conditions)]
    if not isinstance(feeds, list) or not feeds or not all(isinstance(f, dict) for f in feeds):
        raise BundleError("parity inputs are not a list of feed dicts (Polygraphy's --save-inputs format)")
    for i, feed in enumerate(feeds):
        if sorted(feed) != sorted(names):
            raise BundleError(f"parity input {i} has inputs {sorted(feed)}, the graph takes {names}")
        shape = np.shape(feed[INPUT_NAMES[0]])
        batch = shape[0] if shape else 0
        dims = (
            ("batch", batch, profile.batch),
            ("height", shape[2] if len(shape) == 4 else 0, profile.height),
            ("width", shape[3] if len(shape) == 4 else 0, profile.width),
        )
        if len(shape) != 4 or shape[1] != channels or any(not r.min <= size <= r.max for _, size, r in dims):
            raise BundleError(
                f"parity input {i}: sample of shape {list(shape)} is outside the graph's inputs "
                f"(batch {profile.batch.min}-{profile.batch.max}, {channels} channels, height "
                f"{profile.height.min}-{profile.height.max}, width {profile.width.min}-{profile.width.max})"
            )
        for condition in bundle.manifest.conditions:
            tensor_shape = np.shape(feed[condition.name])
            if (
                len(tensor_shape) != 1 + len(condition.shape)
                or tensor_shape[0] != batch
                or any(d != s for d, s in zip(condition.shape, tensor_shape[1:]) if isinstance(d, int))
            ):
                raise BundleError(
                    f"parity input {i}: {condition.name} of shape {list(tensor_shape)} does not fit "
                    f"(batch {batch}, then {list(condition.shape)})"
                )
        if np.shape(feed[INPUT_NAMES[1]]) != (batch,):
            raise BundleError(
                f"parity input {i}: timestep of shape {list(np.shape(feed[INPUT_NAMES[1]]))}, expected [{batch}]"
            )
    return feeds


def replay_parity(
    bundle: Bundle,
    backend: str = "onnxruntime",
    tolerance: float | None = None,
    engine: Path | None = None,
    target: str | None = None,
) -> ParityReport:
    """Replay the bundle's saved inputs on `backend` end to end and compare with its saved reference
    outputs (the fake-quant torch model's), so a CPU box (onnxruntime) and a Jetson (TensorRT) are checked
    against the same data. The graphs are the target profile's that `backend` runs (or `target`'s), at the
    replay tolerance recorded at export unless given. A bundle with timestep groups holds inputs per group,
    replayed on that group's graph. End to end, since an engine cannot expose every quantizer's codes
    without changing what it fuses: the layer-wise check is the export's."""
    if backend not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"unknown backend {backend!r}; choose onnxruntime or tensorrt")
    section = bundle.target(target or bundle.target_for(backend))
    tolerance = section.replay_tolerance if tolerance is None else tolerance
    report = ParityReport(tolerance, ERROR_QUANTILE, [])
    for group in section.timestep_groups:
        directory = group.parity
        with quiet_polygraphy():
            try:
                feeds = load_json(bundle.file(f"{directory}/inputs.json"), description="parity inputs")
                reference = RunResults.load(str(bundle.file(f"{directory}/reference_outputs.json")))
            except (ValueError, TypeError, KeyError, PolygraphyException) as err:
                raise BundleError(
                    f"{bundle.path}: unreadable parity data in {directory}: {' '.join(str(err).split())[:200]}"
                ) from err
        check_feeds(feeds, bundle)
        if backend == "onnxruntime":
            runner = onnxruntime_runner(bundle.file(group.graph), section.parity_optimization_level)
        else:
            from stepquant.runtime.bundle_backends import engine_path
            from stepquant.runtime.tensorrt_backend import tensorrt_version

            tensorrt_version()
            plan = engine_path(bundle, group.graph, engine)
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner

            runner = TrtRunner(EngineFromBytes(BytesFromPath(str(plan))), name="tensorrt")
        report.timesteps += compare_to_reference(runner, feeds, reference, tolerance).timesteps
    return report
