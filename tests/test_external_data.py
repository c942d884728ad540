"""Graphs over protobuf's 2 GB limit are saved with ONNX external data. The threshold is lowered here so the
demo's graphs take that path: exported, checked, linted, replayed and sampled like any other, with their data
files listed in the manifest; a graph whose data lies outside the bundle, or is not listed, is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from stepquant.bundle import BundleError, load_bundle
from stepquant.export import onnx_files
from stepquant.export.config import CalibrationConfig, ChecksConfig
from stepquant.export.faults import forge_bundle
from stepquant.export.lint import lint
from stepquant.export.onnx_files import ExternalDataError, check_external_data, external_data_locations
from stepquant.export.parity import replay_parity
from stepquant.pipeline import ExportConfig, export_quantized
from stepquant.runtime import SamplerConfig
from stepquant.runtime.bundle_backends import quantized_backend


@pytest.fixture(scope="module")
def external_bundle(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("external") / "bundle"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", 0)  # every graph takes the large-graph path
        export_quantized(
            ExportConfig(
                model=str(tiny_model_dir),
                out=out,
                sampler=SamplerConfig(steps=3),
                targets=("tensorrt", "onnxruntime-cpu"),
                progress=False,
                calibration=CalibrationConfig(samples=4),
                checks=ChecksConfig(eval_samples=4),
            )
        )
    return out


def test_large_graphs_keep_their_tensors_beside_them_listed_in_the_manifest(external_bundle):
    bundle = load_bundle(external_bundle)
    graphs = ["model_fp32.onnx", *bundle.graphs()]
    for graph in graphs:
        assert external_data_locations(external_bundle / graph) == [graph + ".data"]
        assert graph + ".data" in bundle.manifest.files
        assert (external_bundle / (graph + ".data")).stat().st_mode & 0o777 == (
            external_bundle / graph
        ).stat().st_mode & 0o777
        proto = onnx.load(str(external_bundle / graph), load_external_data=False)
        assert (
            sum(len(t.raw_data) for t in proto.graph.initializer) < (external_bundle / (graph + ".data")).stat().st_size
        )
    assert not [p for p in external_bundle.rglob("*") if p.name.endswith(".export")]  # no exporter leftovers
    assert not lint(bundle.file("model.onnx"))
    assert replay_parity(bundle).passed
    samples = quantized_backend(bundle, threads=1)
    assert np.isfinite(samples(np.zeros((2, 1, 8, 8), np.float32), np.array([500.0, 20.0], np.float32))).all()


def test_changed_external_data_is_refused_by_its_hash(external_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(external_bundle, copy)
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="model.onnx.data"):
        load_bundle(copy)


def _relocate(graph, location):
    proto = onnx.load(str(graph), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(graph))


def test_a_graph_reading_data_outside_the_bundle_or_unlisted_is_refused(external_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(external_bundle, copy)
    shutil.copy(copy / "model.onnx.data", tmp_path / "outside.data")
    _relocate(copy / "model.onnx", "../outside.data")
    with pytest.raises(ExternalDataError, match="beside the graph"):
        check_external_data(copy / "model.onnx")
    forge_bundle(copy)  # hashes recomputed, as an attacker would
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(copy)
    shutil.copy(copy / "model.onnx.data", copy / "extra.data")  # inside, but no file of the bundle
    _relocate(copy / "model.onnx", "extra.data")
    forge_bundle(copy)  # the manifest still does not list extra.data
    with pytest.raises(BundleError, match="reads tensors from extra.data, which the manifest does not list"):
        load_bundle(copy)
    listed = json.loads((copy / "manifest.json").read_text())["files"]
    assert "extra.data" not in listed


def test_shape_inference_never_serializes_the_weights(monkeypatch, external_bundle, tmp_path):
    """onnx's shape inference serializes the model it is given, which fails past protobuf's 2 GiB. Seeded here
    with a limit below the graph's weights: the FP16 rewrite and the lint's inference still work (they hand
    onnx the graph without its large tensors' data, and put it back), where handing it the whole graph fails."""
    import onnx.shape_inference as shape_inference

    from stepquant.export.precision import convert_to_fp16

    graph = tmp_path / "model.onnx"
    model = onnx.load(str(external_bundle / "model.onnx"))  # the Q/DQ graph, with its data
    onnx.save(model, str(graph))
    weights = onnx_files.tensor_bytes(model)
    limit = model.ByteSize() - weights // 2
    real = shape_inference.infer_shapes

    def limited(proto, *args, **kwargs):
        if proto.ByteSize() > limit:
            raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB (seeded)")
        return real(proto, *args, **kwargs)

    monkeypatch.setattr(shape_inference, "infer_shapes", limited)
    with pytest.raises(ValueError, match="seeded"):
        shape_inference.infer_shapes(model)
    inferred = onnx_files.infer_shapes(model)
    assert len(inferred.graph.value_info) > 0 and onnx_files.tensor_bytes(inferred) == weights  # data put back
    convert_to_fp16(graph)
    converted = onnx.load(str(graph))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in converted.graph.initializer)
    assert not lint(graph)
