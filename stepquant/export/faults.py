"""Seeded faults, each the kind the checks must catch. In an exported Q/DQ graph, the export bugs the
layer-wise parity check must catch: a scale 2% off (one activation quantizer's, or one layer's weight
scales), a zero point swapped for the other storage's, and an activation 2% off upstream of a quantizer with
every scale intact (a wrong float op between two quantizers). In a bundle, what anyone holding it can do:
edit files and the manifest and recompute every hash (`forge_bundle`); only a signature cannot be forged.
The tests, tools/bench_parity.py and tools/robustness.py seed them; nothing else does."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stepquant.export.onnx_export import quantizer_map
from stepquant.export.onnx_files import save_onnx

FACTOR = 1.02


def _constant(graph: onnx.GraphProto, name: str) -> TensorProto:
    for init in graph.initializer:
        if init.name == name:
            return init
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return node.attribute[0].t
    raise KeyError(name)


def _with_new_input(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], index: int, tensor: TensorProto) -> None:
    """Give `nodes` (and only them) `tensor` as input `index`: the original may be shared with other quantizers."""
    graph.initializer.append(tensor)
    for node in nodes:
        node.input[index] = tensor.name


def _activation_pair(graph: onnx.GraphProto, names: dict[str, str], quantizer: str) -> list[onnx.NodeProto]:
    """The QuantizeLinear exported by `quantizer` and the DequantizeLinear reading it."""
    q = next(n for n in graph.node if n.op_type == "QuantizeLinear" and names.get(n.name) == quantizer)
    return [q, *(n for n in graph.node if n.op_type == "DequantizeLinear" and q.output[0] in n.input)]


def activation_scale(graph: onnx.GraphProto, names: dict[str, str], quantizer: str) -> None:
    """Scale the quantizer's Q and DQ scale by FACTOR."""
    pair = _activation_pair(graph, names, quantizer)
    scale = numpy_helper.to_array(_constant(graph, pair[0].input[1]))
    _with_new_input(graph, pair, 1, numpy_helper.from_array((scale * FACTOR).astype(scale.dtype), "fault_scale"))


def weight_scale(graph: onnx.GraphProto, names: dict[str, str], quantizer: str) -> None:
    """Scale every per-channel scale of the weight quantizer's DequantizeLinear by FACTOR."""
    node = next(n for n in graph.node if n.op_type == "DequantizeLinear" and names.get(n.name) == quantizer)
    scale = numpy_helper.to_array(_constant(graph, node.input[1]))
    _with_new_input(graph, [node], 1, numpy_helper.from_array((scale * FACTOR).astype(scale.dtype), "fault_scale"))


def zero_point(graph: onnx.GraphProto, names: dict[str, str], quantizer: str) -> None:
    """Swap the quantizer's zero point for the other storage's: INT8 0 for UINT8 0 (signed codes read as
    unsigned), UINT8 128 for UINT8 0 (the signed grid's offset in unsigned storage), FP8 0 for INT8 0."""
    pair = _activation_pair(graph, names, quantizer)
    current = _constant(graph, pair[0].input[2])
    swapped = {
        TensorProto.INT8: (TensorProto.UINT8, 0),
        TensorProto.UINT8: (TensorProto.UINT8, 0),
        TensorProto.FLOAT8E4M3FN: (TensorProto.INT8, 0),
    }[current.data_type]
    _with_new_input(graph, pair, 2, helper.make_tensor("fault_zero_point", swapped[0], [], [swapped[1]]))
    stale = [info for info in graph.value_info if info.name == pair[0].output[0]]  # the codes' type changed
    for info in stale:
        graph.value_info.remove(info)


def perturbed_input(graph: onnx.GraphProto, names: dict[str, str], quantizer: str) -> None:
    """Multiply the quantizer's input by FACTOR (a Mul before its QuantizeLinear; every scale unchanged)."""
    q = _activation_pair(graph, names, quantizer)[0]
    factor = _constant_like(graph, q.input[1], "fault_factor")
    mul = helper.make_node("Mul", [q.input[0], factor], ["fault_perturbed"], name="fault_mul")
    q.input[0] = "fault_perturbed"
    graph.node.insert(list(graph.node).index(q), mul)


def _constant_like(graph: onnx.GraphProto, like: str, name: str) -> str:
    """A scalar FACTOR of the float type of the tensor `like` (an FP16 graph computes in FP16)."""
    dtype = numpy_helper.to_array(_constant(graph, like)).dtype
    graph.initializer.append(numpy_helper.from_array(np.array(FACTOR, dtype=dtype), name))
    return name


FAULTS: dict[str, tuple[str, Callable[[onnx.GraphProto, dict[str, str], str], None]]] = {
    "activation scale 2% off": ("activation", activation_scale),
    "weight scale 2% off": ("weight", weight_scale),
    "zero point swapped": ("activation", zero_point),
    "activation 2% off upstream of a quantizer": ("activation", perturbed_input),
}


def seed_fault(source: Path, destination: Path, fault: str, quantizer: str | None = None) -> str:
    """Write `source` with `fault` seeded at `quantizer` (default: the middle one of the fault's kind that
    reads a convolution's input) to `destination`; return the quantizer's name."""
    model = onnx.load(str(source))
    names = quantizer_map(model) or {}
    kind, seed = FAULTS[fault]
    if quantizer is None:
        op = "QuantizeLinear" if kind == "activation" else "DequantizeLinear"
        candidates = [
            names[n.name]
            for n in model.graph.node
            if n.op_type == op
            and n.name in names
            and names[n.name].endswith("input_quantizer" if kind == "activation" else "weight_quantizer")
            and "conv" in names[n.name]
        ]
        quantizer = candidates[len(candidates) // 2]
    seed(model.graph, names, quantizer)
    save_onnx(model, str(destination))
    return quantizer


def forge_bundle(bundle: Path, edit: Callable[[dict], None] | None = None, rehash_files: bool = True) -> None:
    """Apply `edit` to the bundle's manifest, then recompute the sha256 of every listed file inside the bundle
    (unless not `rehash_files`) and the manifest's self-hash, as an attacker would leave it."""
    manifest_path = Path(bundle) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if edit is not None:
        edit(manifest)
    for name in list(manifest.get("files", {})) if rehash_files else []:
        path = Path(bundle) / name
        if (
            isinstance(name, str)
            and ".." not in name
            and not name.startswith("/")
            and path.is_file()
            and not path.is_symlink()
        ):
            manifest["files"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def point_at_external_data(proto: onnx.ModelProto, location: str, used: bool = True) -> None:
    """Make the graph's largest weight (or, not `used`, an extra initializer no node reads) load its bytes from
    the external data file `location`: what a forged graph does to read a file it should not."""
    if used:
        tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    else:
        tensor = proto.graph.initializer.add()
        tensor.name, tensor.data_type, tensor.dims[:] = "unused", TensorProto.FLOAT, [4]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=location)
