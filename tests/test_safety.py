"""Safe with a user's files and with a bundle from elsewhere: each category of hostile or bad input ends in a
non-zero exit and one line naming the problem, with no traceback, nothing written or deleted outside --out,
and no file outside the bundle opened. tools/robustness.py runs the long list; these are one or two of each."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_one_line_error, run_cli

from stepquant.bundle import BundleError, load_bundle
from stepquant.bundle.reader import SIGNATURE
from stepquant.bundle.signing import SignatureError, generate_keypair
from stepquant.export.bundle import staged_directory
from stepquant.export.faults import forge_bundle

BIN = Path(sys.executable).parent
OPENED: list[str] = []


def _audit(event: str, args) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


def cli(*args: object, prog: str = "stepquant") -> subprocess.CompletedProcess:
    return run_cli(prog, *args)


@pytest.fixture
def bundle(demo_bundle, tmp_path) -> Path:
    path = tmp_path / "bundle"
    shutil.copytree(demo_bundle[0], path)
    return path


# --- data loss: --overwrite replaces stepquant bundles only ---------------------------------------------

def test_overwrite_never_replaces_the_current_directory_or_the_model(tmp_path, tiny_model_dir, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("valuable")
    monkeypatch.chdir(work)
    assert_one_line_error(cli("--out", "", "--overwrite", prog="export-quantized"), "current directory")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.relative_to(model) for p in model.rglob("*"))
    assert_one_line_error(cli("--model", model, "--out", model, "--overwrite", prog="export-quantized"), "model being exported")
    assert_one_line_error(cli("--model", model / "unet", "--out", model, "--overwrite", prog="export-quantized"),
                   "model being exported")
    assert (work / "thesis.tex").read_text() == "valuable" and sorted(p.relative_to(model) for p in model.rglob("*")) == before


def test_overwrite_replaces_a_bundle_but_not_another_directory(tmp_path, bundle):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(BundleError, match="not a stepquant bundle"):
        with staged_directory(other, overwrite=True):
            pass
    assert (other / "a.jpg").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "photos"]
    with staged_directory(bundle, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in bundle.iterdir()] == ["new.txt"]


# --- a bundle never reaches outside itself ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["../secret.txt", "/etc/hostname", "parity/../../secret.txt"])
def test_listed_paths_outside_the_bundle_are_refused_unopened(bundle, name):
    secret = bundle.parent / "secret.txt"
    secret.write_text("not yours")
    forge_bundle(bundle, lambda m: m["files"].update({name: hashlib.sha256(b"not yours").hexdigest()}))
    OPENED.clear()
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(bundle)
    assert not [p for p in OPENED if "secret" in p or p.startswith("/etc")]


def test_a_graph_path_the_manifest_does_not_list_is_refused(bundle):
    outside = bundle.parent / "evil.onnx"
    shutil.copy(bundle / "model.onnx", outside)
    forge_bundle(bundle, lambda m: m["targets"]["tensorrt"]["timestep_groups"][0].update(graph="../evil.onnx"))
    with pytest.raises(BundleError, match="every graph must be a listed file"):
        load_bundle(bundle)


@pytest.mark.parametrize("linked", ["model.onnx", "parity"])
def test_symbolic_links_inside_a_bundle_are_refused(bundle, linked):
    target = bundle.parent / f"elsewhere-{linked}"
    shutil.move(bundle / linked, target)
    (bundle / linked).symlink_to(target)
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(bundle)


def test_a_manifest_missing_a_key_is_one_line(bundle, tmp_path):
    forge_bundle(bundle, lambda m: m.pop("sampler"))
    assert_one_line_error(cli("sample", "--bundle", bundle, "--n", "1", "--out", tmp_path / "x.npz"),
                   "'sampler' must hold 'scheduler', 'steps'")
    assert not (tmp_path / "x.npz").exists()


def test_a_corrupt_graph_with_matching_hashes_is_one_line(bundle, tmp_path):
    (bundle / "model.onnx").write_bytes(b"\x08\x07garbage")
    forge_bundle(bundle)
    assert_one_line_error(cli("sample", "--bundle", bundle, "--n", "1", "--out", tmp_path / "x.npz"), "onnxruntime cannot load")


# --- signed bundles -----------------------------------------------------------------------------------------

def test_signature_round_trip_and_a_forged_bundle(bundle, tmp_path):
    keys = tmp_path / "keys"
    private, public = generate_keypair(keys)
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    assert_one_line_error(cli("verify", "--bundle", bundle, "--trust-key", public), "not signed")
    assert cli("sign", "--bundle", bundle, "--key", private).returncode == 0
    verified = cli("verify", "--bundle", bundle, "--trust-key", public)
    assert verified.returncode == 0 and "signed by the key" in verified.stdout
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "model.onnx").write_bytes(bytes(data))
    forge_bundle(bundle)  # every hash consistent again, as an attacker would leave it
    assert load_bundle(bundle).manifest  # without a trusted key the forgery loads...
    assert_one_line_error(cli("sample", "--bundle", bundle, "--n", "1", "--out", tmp_path / "x.npz", "--trust-key", public),
                   "signature does not match")  # ...with one it does not
    _, other = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="does not match"):
        load_bundle(bundle, other)
    with pytest.raises(SignatureError, match="never replaced"):
        generate_keypair(keys)


def test_export_signs_with_a_key_and_refuses_an_unreadable_one_first(tiny_model_dir, tmp_path):
    private, public = generate_keypair(tmp_path / "keys")
    fast = ["--model", tiny_model_dir, "--steps", "2", "--calib-samples", "2", "--eval-samples", "2", "--no-progress"]
    assert_one_line_error(cli(*fast, "--out", tmp_path / "b", "--sign-key", public, prog="export-quantized"),
                   "not an unencrypted PEM private key")
    assert cli(*fast, "--out", tmp_path / "b", "--sign-key", private, prog="export-quantized").returncode == 0
    assert (tmp_path / "b" / SIGNATURE).is_file() and load_bundle(tmp_path / "b", public).signed_by == public


# --- interruptions clean up -----------------------------------------------------------------------------------

@pytest.mark.parametrize("signum, message, code", [(signal.SIGTERM, "terminated by SIGTERM", 143),
                                                   (signal.SIGINT, "aborted", 130)])
def test_an_interrupted_export_leaves_nothing(tiny_model_dir, tmp_path, signum, message, code):
    process = subprocess.Popen([str(BIN / "export-quantized"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "b"),
                                "--steps", "25", "--calib-samples", "64", "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # the CLI keeps a SIGINT its parent ignored (as `cmd &` in a script does): start it heeded
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".b.*.partial")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert list(tmp_path.glob(".b.*.partial")), "the export never started staging"
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code and [line for line in err.splitlines() if line.strip()] == [f"export-quantized: error: {message}"]
    assert list(tmp_path.iterdir()) == []


# --- wrong values, named, before any work ----------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--percentile", "0.9999", "--calibrator", "percentile"], "did you mean 99.99"),
    (["--percentile", "-5"], "--percentile must be in (50, 100]"),
    (["--calib-steps", "0"], "--calib-steps must be between 1"),
    (["--calib-steps", "-5"], "--calib-steps must be between 1"),
    (["--steps-per-group", "0"], "--steps-per-group must be between 1"),
    (["--seed", str(2**70)], "--seed must be between 0"),
    (["--recon-scale-lr", "0"], "--recon-scale-lr must be a positive number"),
])
def test_export_values_are_checked_before_any_work(tmp_path, args, fragment):
    started = time.perf_counter()
    assert_one_line_error(cli("--out", tmp_path / "b", *args, prog="export-quantized"), fragment)
    assert list(tmp_path.iterdir()) == [] and time.perf_counter() - started < 30


def test_sample_checks_its_output_and_values_before_sampling(bundle, tmp_path):
    for args, fragment in ((["--out", tmp_path / "x.jpg"], "--out must end in .png or .npz"),
                           (["--out", tmp_path / "missing" / "x.npz"], "not an existing directory"),
                           (["--out", tmp_path / "x.npz", "--batch-size", "0"], "'--batch-size'"),
                           (["--out", tmp_path / "x.npz", "--seed", str(2**70)], "'--seed'"),
                           (["--out", tmp_path / "x.npz", "--n", "1000000000"], "GiB free"),
                           (["--out", tmp_path / "x.png", "--n", "100000"], "a PNG grid holds at most")):
        assert_one_line_error(cli("sample", "--bundle", bundle, "--no-progress", *args), fragment)
    assert list(tmp_path.iterdir()) == ["bundle"] or sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


# --- bounded memory ---------------------------------------------------------------------------------------------

def test_samples_stream_to_the_npz_batch_by_batch(bundle, tmp_path):
    result = cli("sample", "--bundle", bundle, "--n", "5", "--batch-size", "2", "--out", tmp_path / "x.npz", "--no-progress")
    assert result.returncode == 0, result.stderr
    samples = np.load(tmp_path / "x.npz")["samples"]
    assert samples.shape == (5, 1, 16, 16) and samples.dtype == np.float32 and np.isfinite(samples).all()


def test_huge_sample_shapes_are_refused_before_allocating(bundle, tiny_model_dir, tmp_path):
    forge_bundle(bundle, lambda m: m.update(sample_shape=[1, 100000, 100000]))
    assert_one_line_error(cli("sample", "--bundle", bundle, "--n", "1", "--out", tmp_path / "x.npz"), "values per sample")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": 65536}))
    assert_one_line_error(cli("sample", "--model", model, "--n", "1", "--out", tmp_path / "y.npz"), "sample shape")


# --- models: safetensors only, schedules diffusers cannot build --------------------------------------------------

def test_pickle_weights_and_unknown_schedules_are_one_line(tiny_model_dir, tmp_path):
    import torch

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    from safetensors.torch import load_file

    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), pickled / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    assert_one_line_error(cli("--model", pickled, "--out", tmp_path / "b", prog="export-quantized"), "loads safetensors only")
    schedule = tmp_path / "schedule"
    shutil.copytree(tiny_model_dir, schedule)
    config_file = schedule / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "beta_schedule": "cubic"}))
    assert_one_line_error(cli("sample", "--model", schedule, "--n", "1", "--steps", "2", "--out", tmp_path / "x.npz"),
                   "noise schedule cannot drive")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pickled", "schedule"]


# --- lint: files that are not ONNX, graphs without quantizers, every graph of a bundle ------------------------------

def test_lint_refuses_non_graphs_and_checks_every_graph_of_a_bundle(tmp_path, tiny_model_dir):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "two.onnx").write_bytes(b"\x08\x01")
    (tmp_path / "text.onnx").write_text("not a model")
    assert_one_line_error(cli("lint", tmp_path / "empty.onnx"), "not a quantized (Q/DQ) graph")
    assert_one_line_error(cli("lint", tmp_path / "two.onnx"), "not a quantized (Q/DQ) graph")
    assert_one_line_error(cli("lint", tmp_path / "text.onnx"), "not a readable ONNX model")
    groups = tmp_path / "groups"
    assert cli("--model", tiny_model_dir, "--out", groups, "--steps", "4", "--timestep-groups", "2",
               "--calib-samples", "2", "--eval-samples", "2", "--no-progress", prog="export-quantized").returncode == 0
    linted = cli("lint", groups)
    assert linted.returncode == 0 and linted.stdout.count("conforms") == 2
    assert "model_g0.onnx" in linted.stdout and "model_g1.onnx" in linted.stdout
    assert onnx.load(str(groups / "model_g1.onnx")).graph.node
