"""Segment parity: the layer-wise check on the engine a device runs, where the simulation is not at hand.

An end-to-end comparison cannot tell a faulty engine from a correct one that rounds differently: a rounding
tie that flips one code cascades, and on the demo a correct OpenVINO run of the bundle's graph differs from
the simulation by as much (relative L2 3.6e-3) as the same graph with one scale 2% off (5.2e-3). So the graph
is cut at every activation quantizer's codes into segments (DequantizeLinear, the float and integer work of
one layer, QuantizeLinear: what an engine fuses), each compiled on the backend on its own and fed the
reference codes of its inputs: a flipped tie upstream cannot cascade, and each segment's codes are judged by
the export's own policy (export/parity_policy.py).

The reference is onnxruntime running the bundle's hash-checked graph as written (optimisations off), whose
agreement with the simulation the export's gate showed and `stepquant parity --backend onnxruntime`
replays; the graph's float outputs after the last quantizer are compared as a segment too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from stepquant.bundle import Bundle, BundleError
from stepquant.export.parity_policy import AS_WRITTEN, ParityPolicy, engine_policy, parity_policy

# relative L2 of a float segment (a layer whose output is not requantized, or a graph output) against the
# reference: correct FP32 segments on onnxruntime and OpenVINO reach 4e-7, FP16 graphs 3.0e-4; one weight scale
# 2% off 2.0e-2
FLOAT_TOLERANCE = 5e-3

# what runs one segment: a graph path -> a callable from feeds by name to every output, in graph order
SegmentRunner = Callable[[Path], Callable[[dict[str, np.ndarray]], list[np.ndarray]]]


@dataclass
class SegmentParity:
    """One segment's comparison with the reference: codes (or float values) compared and how far apart."""

    output: str  # the quantizer (or graph output) the segment ends at
    inputs: list[str]
    codes: int = 0
    one_step: int = 0
    multi_step: int = 0
    max_steps: int = 0
    float_error: float | None = None  # relative L2, for a float output segment

    @property
    def name(self) -> str:
        """The tensor the segment ends at, as a module path ('up_blocks.0.resnets.0.conv2.input_quantizer')."""
        name = self.output.removeprefix("/").removesuffix("_output_0")
        return ".".join(part for part in name.split("/")[:-1] if part != "unet") or name

    def findings(self, policy: ParityPolicy) -> list[str]:
        if self.float_error is not None:
            too_far = self.float_error > FLOAT_TOLERANCE
            return [f"relative L2 error {self.float_error:.2e} (allowed {FLOAT_TOLERANCE:g})"] if too_far else []
        found = []
        if self.one_step > policy.allowed_one_step(self.codes):
            found.append(f"{self.one_step / self.codes:.2%} of {self.codes} codes one step off")
        if self.multi_step > policy.allowed_multi_step(self.codes):
            found.append(f"{self.multi_step / self.codes:.2%} codes two or more steps off, up to {self.max_steps}")
        return found


@dataclass
class SegmentReport:
    policy: ParityPolicy
    segments: list[SegmentParity]
    feeds: int

    @property
    def failures(self) -> list[tuple[SegmentParity, list[str]]]:
        return [(s, found) for s in self.segments if (found := s.findings(self.policy))]

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        if self.failures:
            shown = "; ".join(f"{s.name}: {', '.join(found)}" for s, found in self.failures[:3])
            more = len(self.failures) - 3
            return f"{len(self.failures)} of {len(self.segments)} segments fail: {shown}" + (
                f"; and {more} more" if more > 0 else ""
            )
        coded = [s for s in self.segments if s.codes]
        worst = max(coded, key=lambda s: s.one_step / s.codes, default=None)
        multi = max((s.max_steps for s in coded), default=0)
        floats = max((s.float_error for s in self.segments if s.float_error is not None), default=0.0)
        return (
            f"{len(self.segments)} segments, codes one step off at most "
            f"{worst.one_step / worst.codes if worst else 0:.3%} (allowed {self.policy.max_one_step_share:.2%}), "
            f"at most {multi} step(s) apart; float outputs within {floats:.1e} (allowed {FLOAT_TOLERANCE:g})"
        )


def _fp8_ordinal(bits: np.ndarray) -> np.ndarray:
    """FP8 E4M3 bit patterns as sign-magnitude integers, so neighbouring values are one apart."""
    magnitude = (bits & 0x7F).astype(np.int32)
    return np.where(bits & 0x80, -magnitude, magnitude)


def step_distance(codes: np.ndarray, reference: np.ndarray, fp8: bool = False) -> np.ndarray:
    """How many grid steps apart two arrays of stored codes (same zero point) are."""
    if fp8:
        return np.abs(_fp8_ordinal(codes.view(np.uint8)) - _fp8_ordinal(reference.view(np.uint8)))
    return np.abs(codes.astype(np.int32) - reference.astype(np.int32))


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    return {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}


def activation_codes(model: onnx.ModelProto) -> list[str]:
    """The tensors holding activation codes: the outputs of QuantizeLinear nodes that read no constant."""
    constants = _constant_names(model.graph)
    return [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]


WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
LAYOUT_OPS = ("Transpose", "Reshape", "Unsqueeze", "Cast")


def _upstream(model: onnx.ModelProto, output: str, cuts: set[str]) -> tuple[list[str], list[onnx.NodeProto]]:
    """The cut tensors and graph inputs that `output` is computed from, walking back no further than a cut,
    and the nodes walked through."""
    producer = {o: n for n in model.graph.node for o in n.output}
    graph_inputs = {i.name for i in model.graph.input}
    found, nodes, stack, seen = [], [], [output], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None:
            continue
        nodes.append(node)
        for tensor in node.input:
            if not tensor or tensor in seen:
                continue
            seen.add(tensor)
            if tensor in cuts or tensor in graph_inputs:
                found.append(tensor)
            else:
                stack.append(tensor)
    return sorted(found), nodes


def _segments(model: onnx.ModelProto) -> list[tuple[str, list[str]]]:
    """(output, inputs) of every segment: one per activation quantizer's codes, then float segments for the
    graph's outputs. Between the last quantizers and an output, each layer with quantized weights ends a float
    segment of its own: at the output, a weight scale 2% off in one layer is diluted by the layers summed with
    it (a residual stream), while that layer's own output shows the 2% itself."""
    codes = activation_codes(model)
    constants = _constant_names(model.graph)
    weights = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    for node in model.graph.node:  # and their layouts (a Linear's weight transposed for its MatMul)
        if node.op_type in LAYOUT_OPS and node.input[0] in weights:
            weights.add(node.output[0])
    graph_outputs = [o.name for o in model.graph.output]
    tails = [node for output in graph_outputs for node in _upstream(model, output, set(codes))[1]]
    layers = list(
        dict.fromkeys(
            n.output[0] for n in reversed(tails) if n.op_type in WEIGHTED_OPS and weights.intersection(n.input)
        )
    )
    cuts = set(codes) | set(layers)
    return [(output, _upstream(model, output, cuts)[0]) for output in [*codes, *layers, *graph_outputs]]


def _marked(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    from polygraphy.backend.onnx import ModifyOutputs

    from stepquant.export.parity import quiet_polygraphy

    with quiet_polygraphy():
        return ModifyOutputs(model, outputs=list(outputs), copy=True)()


def onnxruntime_segments(optimization_level: str) -> SegmentRunner:
    """Segments run by onnxruntime's CPU provider at `optimization_level` (the level the device runs)."""
    import onnxruntime

    from stepquant.export.parity import onnxruntime_session

    def open_segment(path: Path):
        session = onnxruntime_session(path, optimization_level)
        # onnxruntime hands FP8 codes out as their uint8 bits and takes them back only as typed OrtValues
        fp8 = {i.name for i in session.get_inputs() if i.type == "tensor(float8e4m3fn)"}

        def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            typed = {
                name: onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    np.ascontiguousarray(value).view(np.uint8), TensorProto.FLOAT8E4M3FN
                )
                if name in fp8
                else value
                for name, value in feed.items()
            }
            return session.run(None, typed)

        return run

    return open_segment


# A segment's input is a graph input: OpenVINO then requantizes a MatMul's activations on its own (groups of 32),
# 5e-3 to 8e-3 relative on a Linear layer, where in the whole graph it runs the bundle's dequantizer (whole-graph
# outputs bit-identical with and without); so segments are compiled without it
SEGMENT_PROPERTIES = {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}


def openvino_segments(threads: int | None = None, device: str = "CPU") -> SegmentRunner:
    """Segments compiled by OpenVINO on `device`, as `stepquant sample --backend openvino` compiles graphs."""
    from stepquant.runtime.openvino_backend import OpenVINOBackend

    def open_segment(path: Path):
        return OpenVINOBackend(path, threads, device, SEGMENT_PROPERTIES if device.startswith("CPU") else None).run

    return open_segment


def check_segments(
    graph_path: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    runner: SegmentRunner,
    policy: ParityPolicy,
    progress: Callable[[Sequence], Sequence] = lambda items: items,
    reference_graph: Path | None = None,
) -> SegmentReport:
    """Run every segment of the Q/DQ graph at `graph_path` with `runner`, fed the reference's codes, and compare
    its codes with the reference's (onnxruntime running `reference_graph`, default the same graph, as written)."""
    from stepquant.export.parity import onnxruntime_session

    model = onnx.load(str(graph_path))
    if not activation_codes(model):
        raise ValueError(f"{Path(graph_path).name} has no activation quantizers to check segment by segment")
    model = onnx.shape_inference.infer_shapes(model)
    segments = _segments(model)
    extractor = onnx.utils.Extractor(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    reference_model = model if reference_graph is None else onnx.load(str(reference_graph))
    wanted = [output for output, _ in segments]
    graph_inputs = [i.name for i in model.graph.input]
    with tempfile.TemporaryDirectory(prefix="stepquant-segments-") as work:
        work = Path(work)
        marked = work / "reference.onnx"
        onnx.save(_marked(reference_model, wanted), str(marked))
        session = onnxruntime_session(marked, AS_WRITTEN, Path(graph_path).name)
        clean = [{name: np.asarray(feed[name], dtype=np.float32) for name in graph_inputs} for feed in feeds]
        reference = [dict(zip(wanted, session.run(None, feed))) for feed in clean]
        del session
        results = []
        for output, inputs in progress(segments):
            path = work / "segment.onnx"
            segment = extractor.extract_model(inputs, [output])
            onnx.save(segment, str(path))
            result = SegmentParity(output, inputs)
            run = _guarded(runner, path, result.name)
            dtypes = {
                i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in segment.graph.input
            }
            fp8 = types.get(output) == TensorProto.FLOAT8E4M3FN
            for feed, ref in zip(clean, reference):
                got = run({name: _as_type(ref[name] if name in ref else feed[name], dtypes[name]) for name in inputs})[
                    0
                ]
                if types.get(output) in (TensorProto.FLOAT, TensorProto.FLOAT16):
                    want = ref[output].astype(np.float64)
                    error = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
                    result.float_error = max(result.float_error or 0.0, error)
                    continue
                steps = step_distance(np.asarray(got), ref[output], fp8)
                result.codes += steps.size
                result.one_step += int((steps == 1).sum())
                result.multi_step += int((steps >= 2).sum())
                result.max_steps = max(result.max_steps, int(steps.max(initial=0)))
            results.append(result)
    return SegmentReport(policy, results, len(feeds))


def _guarded(runner: SegmentRunner, path: Path, name: str) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """`runner` on the segment at `path`, whose failures (onnxruntime's and OpenVINO's own exception types) become
    one ValueError naming the segment: an engine that cannot run a layer fails the check in one line."""

    def failed(err: Exception) -> ValueError:
        return ValueError(f"the engine cannot run segment {name}: {' '.join(str(err).split())[:300]}")

    try:
        run = runner(path)
    except Exception as err:
        raise failed(err) from err

    def guarded(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return run(feed)
        except Exception as err:
            raise failed(err) from err

    return guarded


def _as_type(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` in the storage a segment's input declares: a graph whose codes are stored otherwise (a zero point
    swapped for the other storage's) gets the reference codes' values, saturated to its type's range."""
    if values.dtype == dtype or not np.issubdtype(dtype, np.integer):
        return values
    info = np.iinfo(dtype)
    return np.clip(values.astype(np.int32), info.min, info.max).astype(dtype)


def bundle_segment_runner(backend: str, optimization_level: str, threads: int | None = None) -> SegmentRunner:
    """The segment runner of a `stepquant parity` backend; TensorRT is checked end to end only."""
    runners: dict[str, Callable[[], SegmentRunner]] = {
        "onnxruntime": lambda: onnxruntime_segments(optimization_level),
        "openvino": lambda: openvino_segments(threads),
    }
    if backend not in runners:
        raise ValueError(f"segment checks run on {' and '.join(runners)}, not {backend}")
    return runners[backend]()


def bundle_engine_policy(bundle: Bundle, backend: str) -> ParityPolicy:
    """The engine policy for the graphs `backend` runs from `bundle`, by the bundle's format and precision."""
    quantization = bundle.manifest.info.get("quantization", {})
    policy = parity_policy(
        bundle.target_for(backend), quantization.get("format", "int8"), quantization.get("precision", "fp32")
    )
    return engine_policy(policy)


def check_bundle_segments(
    bundle: Bundle,
    backend: str,
    threads: int | None = None,
    progress: Callable[[Sequence], Sequence] = lambda items: items,
) -> list[tuple[str, SegmentReport]]:
    """Every graph of the target profile `backend` runs, checked segment by segment on `backend` with the
    bundle's saved parity inputs of its timestep group, under the engine policy of the bundle's format."""
    from polygraphy.json import load_json

    from stepquant.export.parity import check_feeds, quiet_polygraphy

    section = bundle.target(bundle.target_for(backend))
    policy = bundle_engine_policy(bundle, backend)
    runner = bundle_segment_runner(backend, section.onnxruntime_optimization_level, threads)
    reports = []
    for group in section.timestep_groups:
        try:
            with quiet_polygraphy():
                feeds = load_json(bundle.file(f"{group.parity}/inputs.json"), description="parity inputs")
        except (ValueError, TypeError, KeyError) as err:
            raise BundleError(f"{bundle.path}: unreadable parity inputs in {group.parity}: {err}") from err
        check_feeds(feeds, bundle)
        report = check_segments(bundle.file(group.graph), feeds, runner, policy, progress)
        reports.append((group.graph, report))
    return reports
