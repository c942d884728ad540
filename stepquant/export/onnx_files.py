"""ONNX files of any size. Protobuf cannot serialise a message over 2 GB (an FP32 graph of SD 1.5's UNet is
3.4 GB), so a graph whose tensors pass `EXTERNAL_DATA_BYTES` is saved with ONNX external data: one data file
beside it, `<graph>.data`, which the bundle lists with its sha256 like any other file. Every reader here
(onnx, onnxruntime, TensorRT's parser, trtexec) opens such a graph by its path and finds the data beside it;
`check_external_data` refuses, at export, a location that is not a file beside the graph; a bundle's reader
(stepquant.bundle) refuses, on any machine, one that its manifest does not list.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from stepquant.errors import StepquantError

# Tensors above this total go to an external data file: protobuf's limit is 2 GiB for the whole message,
# and the graph's nodes and metadata need room too.
EXTERNAL_DATA_BYTES = int(1.75 * 2**30)
EXTERNAL_TENSOR_MIN_BYTES = 1024  # smaller tensors (scales, zero points, shapes) stay in the graph


class ExternalDataError(StepquantError, ValueError):
    """A graph's external data is missing, outside its bundle, or not listed in it."""


def data_file(path: Path) -> Path:
    """The external data file of the graph at `path`: model.onnx -> model.onnx.data."""
    return path.with_name(path.name + ".data")


def tensor_bytes(model: onnx.ModelProto) -> int:
    """The bytes of every initializer held in the message (external ones count nothing)."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with onnx's inferred types and shapes in its value_info, at any size: onnx serializes the model
    to infer (protobuf's 2 GiB limit), so the data of initializers over `EXTERNAL_TENSOR_MIN_BYTES` is taken
    out for it and put back after (their dims and types are what inference reads; shapes and other small
    constants it evaluates stay)."""
    taken = []
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) > EXTERNAL_TENSOR_MIN_BYTES:
            taken.append((tensor, tensor.raw_data))
            tensor.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    finally:
        for tensor, data in taken:
            tensor.raw_data = data
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path`; with its tensors over `EXTERNAL_DATA_BYTES`, its larger tensors to
    `data_file(path)` (replaced, never appended to). A graph saved small removes a data file of its own."""
    path = Path(path)
    external = data_file(path)
    external.unlink(missing_ok=True)  # onnx appends to an existing data file; ours is written afresh
    if tensor_bytes(model) > EXTERNAL_DATA_BYTES:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external.name,
            size_threshold=EXTERNAL_TENSOR_MIN_BYTES,
        )
    else:
        onnx.save_model(model, str(path))


def external_data_locations(path: Path) -> list[str]:
    """The external data files the graph at `path` names (its tensors are not read)."""
    model = onnx.load(str(path), load_external_data=False)
    tensors = [
        *model.graph.initializer,
        *(a.t for node in model.graph.node for a in node.attribute if a.type == onnx.AttributeProto.TENSOR),
    ]
    return sorted({ExternalDataInfo(t).location for t in tensors if uses_external_data(t)})


def check_external_data(path: Path) -> list[str]:
    """The external data files of the graph at `path`, as names relative to its directory; ExternalDataError
    unless each is a plain file name beside the graph (no directory, no '..', no absolute path) and exists."""
    path = Path(path)
    locations = external_data_locations(path)
    for location in locations:
        if not location or os.path.basename(location) != location or location in (".", ".."):
            raise ExternalDataError(
                f"{path.name} reads its tensors from {location!r}: external data must be a file "
                "beside the graph, in the same directory"
            )
        if not (path.parent / location).is_file():
            raise ExternalDataError(f"{path.name} reads its tensors from {location}, which is missing")
    return locations


@contextlib.contextmanager
def graph_beside(model: onnx.ModelProto, path: Path) -> Iterator[Path]:
    """A temporary file holding `model` (read from `path` without its external data) in `path`'s directory,
    so its external data locations still resolve; removed on exit. For graphs edited before a session opens
    them (marked outputs), whatever their size."""
    handle, name = tempfile.mkstemp(prefix=f".{Path(path).stem}.", suffix=".onnx", dir=Path(path).parent)
    os.close(handle)
    try:
        onnx.save_model(model, name)
        yield Path(name)
    finally:
        os.unlink(name)
