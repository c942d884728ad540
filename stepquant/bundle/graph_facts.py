"""What an ONNX graph in a bundle will make an engine read, found from its own protobuf bytes.

The device runtime has no `onnx` package, yet onnxruntime opens whatever external-data file a graph names,
and a forged graph can hide a NaN scale or inputs that disagree with the manifest. This module walks the
protobuf wire format (a few field numbers of onnx.proto, no generated code) and reports: the external-data
locations of every tensor (initializers, sparse initializers, Constant nodes and subgraphs, used or not),
the declared graph inputs, and the scale tensors of every QuantizeLinear/DequantizeLinear node. Tensor
payloads are skipped without being copied, so a graph of any size is read in one pass over a memory map.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# onnx.proto field numbers, by message
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_FUNCTION_NODE = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_SPARSE_INITIALIZER = 1, 5, 11, 15
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP_TYPE, _NODE_ATTRIBUTE = 1, 2, 4, 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_TENSOR_TYPE, _TENSOR_FLOATS, _TENSOR_NAME, _TENSOR_RAW, _TENSOR_EXTERNAL = 2, 4, 8, 9, 13
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VALUE_NAME, _VALUE_TYPE, _TYPE_TENSOR, _TENSOR_TYPE_SHAPE, _SHAPE_DIM, _DIM_VALUE, _DIM_PARAM = 1, 2, 1, 2, 1, 1, 2
_FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # TensorProto.DataType codes a scale may have
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
MAX_GRAPH_DEPTH = 32  # nested subgraphs; deeper is not a graph stepquant writes


class GraphFormatError(ValueError):
    """The bytes are not an ONNX model this reader can walk."""


@dataclass
class GraphFacts:
    """What a graph declares and references (see the module docstring)."""

    external_data: set[str] = field(default_factory=set)  # locations, as written in the graph
    inputs: dict[str, tuple[int | str | None, ...]] = field(
        default_factory=dict
    )  # name -> dims (int, symbol or unknown)
    scales: dict[str, np.ndarray | None] = field(default_factory=dict)  # Q/DQ scale tensor -> values (None: not inline)


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise GraphFormatError("a varint runs past the end of its message")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of one message: an int, or the bytes of a
    length-delimited field (a view, not a copy)."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 1:
            value, at = int.from_bytes(data[at : at + 8], "little"), at + 8
        elif wire == 2:
            size, at = _varint(data, at)
            if at + size > len(data):
                raise GraphFormatError("a field runs past the end of its message")
            value, at = data[at : at + size], at + size
        elif wire == 5:
            value, at = int.from_bytes(data[at : at + 4], "little"), at + 4
        else:
            raise GraphFormatError(f"wire type {wire} is not used by ONNX")
        if number == 0 or at > len(data):
            raise GraphFormatError("a field is cut short or numbered 0")
        yield number, wire, value


def _each(data: memoryview, number: int) -> Iterator[int | memoryview]:
    """The values of field `number` of one message, in order."""
    return (value for found, _, value in _fields(data) if found == number)


def _text(value) -> str:
    if not isinstance(value, memoryview):
        raise GraphFormatError("a string field has a numeric wire type")
    return bytes(value).decode("utf-8", errors="replace")


@dataclass
class _Tensor:
    name: str = ""
    data_type: int = 0
    raw: memoryview | None = None
    floats: memoryview | None = None
    location: str | None = None

    def values(self) -> np.ndarray | None:
        dtype = _FLOAT_TYPES.get(self.data_type)
        if dtype is None or self.location is not None:
            return None
        if self.raw is not None:
            data = np.frombuffer(self.raw, dtype=np.dtype(dtype).newbyteorder("<"))
        elif self.floats is not None and self.data_type == 1:
            data = np.frombuffer(self.floats, dtype="<f4")
        else:
            return None
        return data.astype(np.float64)


def _tensor(data: memoryview, facts: GraphFacts) -> _Tensor:
    tensor = _Tensor()
    for number, wire, value in _fields(data):
        if number == _TENSOR_TYPE and wire == 0:
            tensor.data_type = value
        elif number == _TENSOR_NAME:
            tensor.name = _text(value)
        elif number == _TENSOR_RAW and wire == 2:
            tensor.raw = value
        elif number == _TENSOR_FLOATS and wire == 2:
            tensor.floats = value
        elif number == _TENSOR_EXTERNAL:
            entry = {k: _text(v) for k, _, v in _fields(value) if k in (_ENTRY_KEY, _ENTRY_VALUE)}
            if entry.get(_ENTRY_KEY) == "location":
                tensor.location = entry.get(_ENTRY_VALUE, "")
    if tensor.location is not None:
        facts.external_data.add(tensor.location)
    return tensor


def _sparse(data: memoryview, facts: GraphFacts) -> None:
    for number in (_SPARSE_VALUES, _SPARSE_INDICES):
        for value in _each(data, number):
            _tensor(value, facts)


def _dimension(data: memoryview) -> int | str | None:
    """A Dimension: its size, its symbol, or None (unknown)."""
    found: int | str | None = None
    for which, _, value in _fields(data):
        found = value if which == _DIM_VALUE else _text(value) if which == _DIM_PARAM else found
    return found


def _value_info(data: memoryview) -> tuple[str, tuple[int | str | None, ...]]:
    """A ValueInfoProto's name and, for a tensor, its dims."""
    names = [_text(value) for value in _each(data, _VALUE_NAME)]
    dims = [
        _dimension(dim)
        for kind in _each(data, _VALUE_TYPE)
        for tensor in _each(kind, _TYPE_TENSOR)
        for shape in _each(tensor, _TENSOR_TYPE_SHAPE)
        for dim in _each(shape, _SHAPE_DIM)
    ]
    return (names[-1] if names else ""), tuple(dims)


def _nodes(
    data: memoryview, facts: GraphFacts, constants: dict[str, _Tensor], scale_names: set[str], depth: int
) -> None:
    """One NodeProto: its attribute tensors and subgraphs, Constant outputs, and Q/DQ scale inputs."""
    inputs, outputs, op_type, tensors = [], [], "", []
    for number, _, value in _fields(data):
        if number == _NODE_INPUT:
            inputs.append(_text(value))
        elif number == _NODE_OUTPUT:
            outputs.append(_text(value))
        elif number == _NODE_OP_TYPE:
            op_type = _text(value)
        elif number == _NODE_ATTRIBUTE:
            for part, _, item in _fields(value):
                if part in (_ATTR_T, _ATTR_TENSORS):
                    tensors.append(_tensor(item, facts))
                elif part in (_ATTR_SPARSE, _ATTR_SPARSES):
                    _sparse(item, facts)
                elif part in (_ATTR_G, _ATTR_GRAPHS):
                    _graph(item, facts, depth + 1, top=False)
    if op_type in _QDQ and len(inputs) > 1 and inputs[1]:
        scale_names.add(inputs[1])
    elif op_type == "Constant" and outputs and tensors:  # a scale may be a Constant node's value
        constants.setdefault(outputs[0], tensors[0])


def _graph(data: memoryview, facts: GraphFacts, depth: int = 0, top: bool = True) -> None:
    if depth > MAX_GRAPH_DEPTH:
        raise GraphFormatError(f"subgraphs nested over {MAX_GRAPH_DEPTH} deep")
    tensors: dict[str, _Tensor] = {}
    scale_names: set[str] = set()
    for number, _, value in _fields(data):
        if number == _GRAPH_INITIALIZER:
            tensor = _tensor(value, facts)
            tensors[tensor.name] = tensor
        elif number == _GRAPH_SPARSE_INITIALIZER:
            _sparse(value, facts)
        elif number == _GRAPH_NODE:
            _nodes(value, facts, tensors, scale_names, depth)
        elif number == _GRAPH_INPUT and top:
            name, dims = _value_info(value)
            facts.inputs[name] = dims
    for name in scale_names:
        facts.scales[name] = tensors[name].values() if name in tensors else None
    if top:
        facts.inputs = {
            name: dims for name, dims in facts.inputs.items() if name not in tensors
        }  # initializers, not inputs


def read_graph_facts(path: Path) -> GraphFacts:
    """The external data, inputs and Q/DQ scales of the ONNX model at `path`; GraphFormatError if its
    bytes are not a model this reader can walk."""
    facts = GraphFacts()
    with open(path, "rb") as handle:
        if handle.seek(0, 2) == 0:
            raise GraphFormatError("the file is empty")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)  # closed when the last view is gone
    graphs = 0
    for number, _, value in _fields(memoryview(mapped)):
        if number == _MODEL_GRAPH and isinstance(value, memoryview):
            graphs += 1
            _graph(value, facts)
        elif number == _MODEL_FUNCTIONS and isinstance(value, memoryview):
            for node in _each(value, _FUNCTION_NODE):
                _nodes(node, facts, {}, set(), 1)
    if graphs != 1:
        raise GraphFormatError("it holds no graph" if not graphs else "it holds more than one graph")
    return facts
