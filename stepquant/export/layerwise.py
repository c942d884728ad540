"""Layer-wise, teacher-forced parity: the export's gate between a fake-quant model and its Q/DQ graph.

Every quantizer of the graph is compared with the simulation's quantizer on the same input:
- onnxruntime runs the graph with every QuantizeLinear output exposed (Polygraphy's ModifyOutputs on
  an in-memory copy), giving each activation quantizer's integer (or FP8) codes;
- torch runs the fake-quant model with each activation quantizer's output replaced by the graph's codes
  times the calibrated scale, so the float computation between two quantizers starts from the graph's
  own values and a rounding tie that flips one code upstream cannot cascade;
- each quantizer's simulated codes (for torch's input to it) are compared with the graph's: the share one
  step apart (a float tie: expected, rare) and the share two or more steps apart (a fault);
- statically, every scale, zero point and integer weight in the graph must be bit-equal to the calibrated one.

The graph's quantizers are matched to the simulation's by the module names the export recorded for its
Q/DQ nodes (export/onnx_export.py's quantizer map).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
from torch import nn

from stepquant.export.onnx_export import QUANTIZER_MAP, quantizer_map
from stepquant.export.onnx_files import graph_beside
from stepquant.export.parity_policy import ParityPolicy
from stepquant.quant.grid import Fp8Grid
from stepquant.quant.layers import ActivationQuantizer, WeightQuantizer

# a grid's storage type -> its ONNX type, and the numpy type onnxruntime returns its codes in (FP8 as bits)
_STORAGE_TYPES = {
    torch.int8: (TensorProto.INT8, np.int8),
    torch.uint8: (TensorProto.UINT8, np.uint8),
    torch.float8_e4m3fn: (TensorProto.FLOAT8E4M3FN, np.uint8),
}


class LayerwiseParityError(ValueError):
    """The graph and the simulation cannot be compared quantizer by quantizer (not a quantized graph,
    quantizers that do not correspond, inputs of the wrong shape)."""


@dataclass
class QuantizerParity:
    """One quantizer's comparison: codes compared, how many one and two-or-more steps apart, and the
    static mismatches (scale, zero point, weights) found in the graph."""

    name: str  # the simulation's module name
    node: str  # the graph's QuantizeLinear (activations) or DequantizeLinear (weights)
    kind: str  # "activation" or "weight"
    codes: int = 0
    one_step: int = 0
    multi_step: int = 0
    max_steps: float = 0.0
    mismatches: list[str] = field(default_factory=list)

    @property
    def one_step_share(self) -> float:
        return self.one_step / self.codes if self.codes else 0.0

    @property
    def multi_step_share(self) -> float:
        return self.multi_step / self.codes if self.codes else 0.0

    def findings(self, policy: ParityPolicy) -> list[str]:
        """What fails this quantizer under `policy`, one phrase each."""
        found = [f"{what} differs from the calibrated one" for what in self.mismatches]
        if self.one_step > policy.allowed_one_step(self.codes):
            found.append(
                f"{self.one_step_share:.2%} of {self.codes} codes one step off "
                f"(allowed {policy.max_one_step_share:.2%})"
            )
        if self.multi_step > policy.allowed_multi_step(self.codes):
            found.append(
                f"{self.multi_step_share:.2%} of {self.codes} codes two or more steps off, up to "
                f"{self.max_steps:g} (allowed {policy.max_multi_step_share:.2%})"
            )
        return found


@dataclass
class LayerwiseReport:
    """The layer-wise check of one graph: every quantizer's comparison under one policy."""

    policy: ParityPolicy
    quantizers: list[QuantizerParity]
    feeds: int

    @property
    def failures(self) -> list[tuple[QuantizerParity, list[str]]]:
        return [(q, found) for q in self.quantizers if (found := q.findings(self.policy))]

    @property
    def passed(self) -> bool:
        return not self.failures

    def worst(self, share: str) -> QuantizerParity | None:
        activations = [q for q in self.quantizers if q.kind == "activation"]
        return max(activations, key=lambda q: getattr(q, share), default=None)

    def summary(self) -> str:
        """One line: what was checked and the worst shares, or the first failures."""
        if self.failures:
            shown = "; ".join(f"{q.name} ({q.node}): {', '.join(found)}" for q, found in self.failures[:3])
            more = len(self.failures) - 3
            return f"{len(self.failures)} of {len(self.quantizers)} quantizers fail: {shown}" + (
                f"; and {more} more" if more > 0 else ""
            )
        one, multi = self.worst("one_step_share"), self.worst("multi_step_share")
        return (
            f"{len(self.quantizers)} quantizers, scales, zero points and weights bit-equal; codes one step off "
            f"at most {one.one_step_share if one else 0:.3%}, two or more steps off at most "
            f"{multi.multi_step_share if multi else 0:.3%} (allowed {self.policy.max_one_step_share:.2%} / "
            f"{self.policy.max_multi_step_share:.2%})"
        )

    def to_dict(self) -> dict:
        activations = [q for q in self.quantizers if q.kind == "activation"]
        one, multi = self.worst("one_step_share"), self.worst("multi_step_share")
        return {
            "check": "layer-wise integer codes, teacher-forced",
            "policy": asdict(self.policy),
            "passed": self.passed,
            "feeds": self.feeds,
            "activation_quantizers": len(activations),
            "weight_quantizers": len(self.quantizers) - len(activations),
            "codes_compared": sum(q.codes for q in activations),
            "codes_one_step_off": sum(q.one_step for q in activations),
            "codes_multi_step_off": sum(q.multi_step for q in activations),
            "worst_one_step_share": {"quantizer": one.name, "share": one.one_step_share} if one else None,
            "worst_multi_step_share": {"quantizer": multi.name, "share": multi.multi_step_share} if multi else None,
            "failures": [{"quantizer": q.name, "node": q.node, "findings": found} for q, found in self.failures],
        }


@dataclass(frozen=True)
class _GraphQuantizer:
    node: onnx.NodeProto
    dequantize: onnx.NodeProto | None  # an activation Q's DequantizeLinear


def _constants(graph: onnx.GraphProto, base_dir: Path) -> dict[str, TensorProto]:
    """Initializers and Constant values by name; external ones read from `base_dir` into copies (the graph
    itself keeps its references, so a marked copy of it stays small)."""
    constants = {}
    for init in graph.initializer:
        if uses_external_data(init):
            loaded = TensorProto()
            loaded.CopyFrom(init)
            load_external_data_for_tensor(loaded, str(base_dir))
            loaded.data_location = TensorProto.DEFAULT
            del loaded.external_data[:]
            init = loaded
        constants[init.name] = init
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    return constants


def _graph_quantizers(model: onnx.ModelProto, constants: dict, path: Path) -> tuple[dict, dict]:
    """The graph's activation quantizers (QuantizeLinear, with the DequantizeLinear reading it) and weight
    quantizers (DequantizeLinear of a constant), as {module name: [node, ...]} in graph order."""
    graph, model_map = model.graph, quantizer_map(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    activations = [
        _GraphQuantizer(
            node, next((c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"), None)
        )
        for node in graph.node
        if node.op_type == "QuantizeLinear"
    ]
    weights = [
        _GraphQuantizer(node, None)
        for node in graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in constants
    ]
    if not activations and not weights:
        raise LayerwiseParityError(
            f"{path.name} has no QuantizeLinear or DequantizeLinear node: it is not a quantized graph"
        )
    if model_map is None:
        raise LayerwiseParityError(
            f"{path.name} carries no quantizer map ({QUANTIZER_MAP} metadata): only graphs exported "
            "by stepquant can be compared with their simulation layer by layer"
        )
    by_module: tuple[dict, dict] = ({}, {})
    for grouped, found in zip(by_module, (activations, weights)):
        for graph_q in found:
            if graph_q.node.name not in model_map:
                raise LayerwiseParityError(
                    f"{path.name}: {graph_q.node.op_type} node {graph_q.node.name!r} is not in the "
                    "graph's quantizer map (the graph was edited after export)"
                )
            grouped.setdefault(model_map[graph_q.node.name], []).append(graph_q)
    return by_module


def _forward(model: nn.Module, feed: dict[str, np.ndarray], names: Sequence[str]) -> torch.Tensor:
    """`model` called on the feed's tensors in the graph's input order (its forward's argument order)."""
    with torch.inference_mode():
        return model.eval()(*(torch.from_numpy(np.asarray(feed[n], dtype=np.float32)) for n in names))


def _unmatched(
    graph_side: dict[str, list[_GraphQuantizer]], calls: Counter, kind: str, path: Path
) -> LayerwiseParityError:
    nodes = Counter({name: len(found) for name, found in graph_side.items()})
    only_graph, only_simulation = sorted((nodes - calls).elements()), sorted((calls - nodes).elements())
    return LayerwiseParityError(
        f"{path.name}'s {kind} quantizers do not match the simulation's ({sum(nodes.values())} in the graph, "
        f"{sum(calls.values())} simulated); only in the graph: {only_graph[:3] or 'none'}, only simulated: "
        f"{only_simulation[:3] or 'none'}: the graph was not exported from this model"
    )


def _array(tensor: TensorProto) -> np.ndarray:
    """The tensor's values; FP8 as their bit patterns (uint8), so comparisons are bit-exact."""
    if tensor.data_type == TensorProto.FLOAT8E4M3FN:
        return (
            np.frombuffer(tensor.raw_data, dtype=np.uint8).reshape(tuple(tensor.dims))
            if tensor.raw_data
            else np.asarray(tensor.int32_data, dtype=np.uint8).reshape(tuple(tensor.dims))
        )
    return numpy_helper.to_array(tensor)


def _torch_bits(tensor: torch.Tensor) -> np.ndarray:
    return (tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor).detach().cpu().numpy()


def _static_mismatches(
    node: onnx.NodeProto, constants: dict, scale: torch.Tensor, storage: torch.dtype, zero_point: float
) -> list[str]:
    """Whether `node`'s scale equals `scale` (bit for bit, after widening the graph's FP16 scales) and its
    zero point is `zero_point` stored as `storage`."""
    found = []
    graph_scale = constants.get(node.input[1])
    if graph_scale is None or not np.array_equal(
        _array(graph_scale).astype(np.float32).reshape(-1), scale.detach().float().reshape(-1).cpu().numpy()
    ):
        found.append(f"{node.op_type} scale")
    graph_zero = constants.get(node.input[2]) if len(node.input) > 2 else None
    expected = _torch_bits(torch.full((1,), zero_point).to(storage))
    if (
        graph_zero is None
        or graph_zero.data_type != _STORAGE_TYPES[storage][0]
        or not (_array(graph_zero).reshape(-1) == expected[0]).all()
    ):
        found.append(f"{node.op_type} zero point")
    return found


def _step_distance(graph_codes: np.ndarray, simulated: torch.Tensor, quantizer: ActivationQuantizer) -> np.ndarray:
    """How many grid steps apart the graph's codes and the simulated grid values are."""
    if isinstance(quantizer.grid, Fp8Grid):  # FP8 bit patterns ordered as sign-magnitude integers

        def ordinal(bits: np.ndarray) -> np.ndarray:
            magnitude = (bits & 0x7F).astype(np.int32)
            return np.where(bits & 0x80, -magnitude, magnitude)

        return np.abs(ordinal(graph_codes) - ordinal(_torch_bits(simulated.to(torch.float8_e4m3fn))))
    return np.abs(graph_codes.astype(np.int32) - quantizer.grid.zero_point - simulated.cpu().numpy().astype(np.int32))


def _grid_values(graph_codes: np.ndarray, quantizer: ActivationQuantizer) -> torch.Tensor:
    """The graph's codes as grid values (what its DequantizeLinear multiplies by the scale)."""
    if isinstance(quantizer.grid, Fp8Grid):
        return torch.from_numpy(np.ascontiguousarray(graph_codes)).view(torch.float8_e4m3fn).float()
    return torch.from_numpy(graph_codes.astype(np.float32) - quantizer.grid.zero_point)


def _marked_session(model: onnx.ModelProto, path: Path, outputs: list[str], optimization_level: str):
    """An onnxruntime session of a copy of `model` (read from `path` without its external data) whose outputs
    are `outputs`; opened from a file beside `path`, so external data resolves at any size."""
    from polygraphy.backend.onnx import ModifyOutputs

    from stepquant.export.parity import onnxruntime_session, quiet_polygraphy

    with quiet_polygraphy():
        marked = ModifyOutputs(model, outputs=outputs, copy=True)()
    with graph_beside(marked, path) as copy:
        return onnxruntime_session(copy, optimization_level, path.name)


def _check_feeds(session, feeds: Sequence[dict[str, np.ndarray]], path: Path) -> None:
    """Refuse feeds without the graph's inputs or with shapes it cannot take, before anything runs."""
    if not feeds:
        raise LayerwiseParityError("no parity inputs to compare on")
    for i, feed in enumerate(feeds):
        for graph_input in session.get_inputs():
            if graph_input.name not in feed:
                raise LayerwiseParityError(f"parity input {i} lacks the graph input {graph_input.name!r}")
            shape = np.shape(feed[graph_input.name])
            if len(shape) != len(graph_input.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(graph_input.shape, shape)
            ):
                raise LayerwiseParityError(
                    f"parity input {i}: {graph_input.name} of shape {list(shape)}, the graph "
                    f"takes {list(graph_input.shape)} ({path.name})"
                )


def check_layerwise(
    model: nn.Module, path: Path, feeds: Sequence[dict[str, np.ndarray]], policy: ParityPolicy
) -> tuple[LayerwiseReport, list[np.ndarray]]:
    """Compare the Q/DQ graph at `path` with the fake-quant `model` it was exported from, quantizer by
    quantizer, on `feeds` (Polygraphy feed dicts); return the report and the graph's outputs per feed."""
    path = Path(path)
    graph = onnx.load(str(path), load_external_data=False)
    constants = _constants(graph.graph, path.parent)
    activations, weights = _graph_quantizers(graph, constants, path)
    code_names = [q.node.output[0] for found in activations.values() for q in found]
    output = next(iter(graph.graph.output)).name
    session = _marked_session(graph, path, [output, *code_names], policy.optimization_level)
    _check_feeds(session, feeds, path)
    input_names = [i.name for i in session.get_inputs()]
    comparison = _ForcedComparison(model, activations, weights, path)
    outputs = []
    for feed in feeds:
        try:
            ran = session.run(None, {name: np.asarray(feed[name], dtype=np.float32) for name in input_names})
        except Exception as err:  # onnxruntime's own errors (its exception types are not exported)
            raise LayerwiseParityError(
                f"{path.name} cannot run the parity inputs: {' '.join(str(err).split())[:300]}"
            ) from err
        outputs.append(ran[0])
        comparison.run(feed, input_names, dict(zip(code_names, ran[1:])))
    return LayerwiseReport(policy, comparison.results(constants), len(feeds)), outputs


class _ForcedComparison:
    """Runs the model with each activation quantizer's output forced to the graph's codes (times its
    calibrated scale), matching each quantizer call to the graph's node of that module (a module called
    twice has two), and counts how far the simulated codes of torch's input to it are from the graph's."""

    def __init__(self, model: nn.Module, activations: dict, weights: dict, path: Path) -> None:
        self.model, self.activations, self.weights, self.path = model, activations, weights, path
        self.names = {id(m): n for n, m in model.named_modules()}
        self.compared: dict[str, tuple[QuantizerParity, _GraphQuantizer, ActivationQuantizer]] = {}
        self.weight_calls: dict[str, tuple[_GraphQuantizer, WeightQuantizer]] = {}

    def run(self, feed: dict, input_names: Sequence[str], graph_codes: dict[str, np.ndarray]) -> None:
        calls: Counter = Counter()
        weight_calls: Counter = Counter()

        def forced(module: ActivationQuantizer, args, output):
            if not module.enabled:
                return None
            name = self.names[id(module)]
            nodes = self.activations.get(name, [])
            if calls[name] >= len(nodes):
                calls[name] += 1
                raise _unmatched(self.activations, calls, "activation", self.path)
            graph_q = nodes[calls[name]]
            calls[name] += 1
            result = self.compared.setdefault(
                graph_q.node.name, (QuantizerParity(name, graph_q.node.name, "activation"), graph_q, module)
            )[0]
            return _compare(module, args[0], graph_codes[graph_q.node.output[0]], output, result)

        def weight(module: WeightQuantizer, _args):
            if module.enabled:
                name = self.names[id(module)]
                nodes = self.weights.get(name, [])
                if weight_calls[name] < len(nodes):
                    self.weight_calls.setdefault(
                        nodes[weight_calls[name]].node.name, (nodes[weight_calls[name]], module)
                    )
                weight_calls[name] += 1

        hooks = [m.register_forward_hook(forced) for m in self.model.modules() if isinstance(m, ActivationQuantizer)]
        hooks += [m.register_forward_pre_hook(weight) for m in self.model.modules() if isinstance(m, WeightQuantizer)]
        try:
            _forward(self.model, feed, input_names)
        finally:
            for hook in hooks:
                hook.remove()
        for kind, graph_side, counted in (
            ("activation", self.activations, calls),
            ("weight", self.weights, weight_calls),
        ):
            if counted != Counter({name: len(found) for name, found in graph_side.items()}):
                raise _unmatched(graph_side, counted, kind, self.path)

    def results(self, constants: dict) -> list[QuantizerParity]:
        """Every quantizer's comparison, with the static checks of its graph nodes against the calibrated values."""
        results = []
        for result, graph_q, quantizer in self.compared.values():
            for node in filter(None, (graph_q.node, graph_q.dequantize)):
                result.mismatches += _static_mismatches(
                    node, constants, quantizer.scale, quantizer.grid.storage_dtype, quantizer.grid.zero_point
                )
            if graph_q.dequantize is None:
                result.mismatches.append("DequantizeLinear (none reads the codes)")
            results.append(result)
        for graph_q, quantizer in self.weight_calls.values():
            result = QuantizerParity(self.names[id(quantizer)], graph_q.node.name, "weight")
            result.mismatches = _static_mismatches(
                graph_q.node, constants, quantizer.scale, quantizer.grid.storage_dtype, 0
            )
            stored = constants[graph_q.node.input[0]]
            if stored.data_type != _STORAGE_TYPES[quantizer.grid.storage_dtype][0] or not np.array_equal(
                _array(stored).reshape(-1), _torch_bits(quantizer.qweight).reshape(-1)
            ):
                result.mismatches.append("integer weights")
            results.append(result)
        return results


def _compare(
    module: ActivationQuantizer, x: torch.Tensor, codes: np.ndarray, output: torch.Tensor, result: QuantizerParity
) -> torch.Tensor | None:
    """Count `result`'s step distances between the graph's `codes` and the simulation's for `x`; return the
    graph's values to continue from (None, torch's own, where the codes are on another grid)."""
    expected = _STORAGE_TYPES[module.grid.storage_dtype][1]
    if codes.dtype != expected:  # a zero point of another type: codes on another grid, nothing to force
        finding = f"codes stored as {codes.dtype}, not {np.dtype(expected)}"
        if finding not in result.mismatches:
            result.mismatches.append(finding)
        return None
    if tuple(codes.shape) != tuple(x.shape):
        raise LayerwiseParityError(
            f"{result.node}: the graph's codes have shape {list(codes.shape)}, the simulation's input {list(x.shape)}"
        )
    steps = _step_distance(codes, module.grid.quantize(x.float(), module.scale), module)
    result.codes += steps.size
    result.one_step += int((steps == 1).sum())
    result.multi_step += int((steps >= 2).sum())
    result.max_steps = max(result.max_steps, float(steps.max(initial=0)))
    return (_grid_values(codes, module).to(output.device) * module.scale).to(output.dtype)
