"""Bundle round trip and every refusal: changed bytes, missing files, edited manifest, other versions."""

import json
import shutil

import pytest

from stepquant.bundle import FORMAT_VERSION, BundleError, load_bundle
from stepquant.export.bundle import staged_directory, write_manifest


@pytest.fixture
def bundle_copy(demo_bundle, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(demo_bundle[0], path)
    return path


def test_round_trip(demo_bundle):
    bundle = load_bundle(demo_bundle[0])
    raw = json.loads((demo_bundle[0] / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION
    manifest = bundle.manifest
    assert {"model.onnx", "model_fp32.onnx", "preview.png", "parity/inputs.json"} <= set(manifest.files)
    assert (
        manifest.sample_shape == (1, 16, 16)
        and manifest.sampler.steps == 4
        and manifest.samplers[0].scheduler_table["steps"] == 4
    )
    for key in ("quantization", "calibration", "versions", "parity"):
        assert key in manifest.info
    assert manifest.info["quantization"]["weight_bits"] == 8
    # typed once: what the export wrote is what the manifest reads back
    body = {k: v for k, v in raw.items() if k not in ("format_version", "files", "manifest_sha256")}
    assert json.loads(json.dumps(manifest.to_dict())) == body


def test_an_older_format_names_the_release_that_reads_it(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 4
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        BundleError,
        match="format version 4 is not supported .*re-export it with this stepquant, or read it with stepquant 0.1.0",
    ):
        load_bundle(bundle_copy)


def test_a_changed_byte_is_refused(bundle_copy):
    model = bundle_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 of model.onnx"):
        load_bundle(bundle_copy)


def test_a_missing_file_is_refused(bundle_copy):
    (bundle_copy / "parity" / "inputs.json").unlink()
    with pytest.raises(BundleError, match="incomplete: parity/inputs.json is missing"):
        load_bundle(bundle_copy)


def test_an_edited_manifest_is_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["samplers"][0]["sampler"]["steps"] = 50
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="modified after export"):
        load_bundle(bundle_copy)


def test_other_format_versions_and_non_bundles_are_refused(bundle_copy, tmp_path):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="not a stepquant bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nothing")


def test_staging_leaves_nothing_behind_on_failure(tmp_path):
    destination = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_directory(destination) as staging:
            (staging / "model.onnx").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_staging_refuses_to_replace_without_overwrite_and_replaces_a_bundle_with_it(bundle_copy, tmp_path):
    with pytest.raises(BundleError, match="already exists"):
        with staged_directory(bundle_copy):
            pass
    manifest = load_bundle(bundle_copy).manifest
    with staged_directory(bundle_copy, overwrite=True) as staging:
        (staging / "new.json").write_text("{}")
        write_manifest(staging, manifest)
    assert sorted(p.name for p in bundle_copy.iterdir()) == ["manifest.json", "new.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert list(json.loads((bundle_copy / "manifest.json").read_text())["files"]) == ["new.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "old.txt").write_text("old")
    with pytest.raises(BundleError, match="not a stepquant bundle"):
        with staged_directory(other, overwrite=True):
            pass
    assert (other / "old.txt").read_text() == "old"
