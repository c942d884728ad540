"""The commands as a user runs them: one end-to-end export on the demo model, sampling, and every
kind of bad input ending in one clear line, a non-zero exit and no partial output."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

BIN = Path(sys.executable).parent
FAST = ["--steps", "3", "--calib-samples", "4", "--eval-samples", "4", "--no-progress"]


run = run_cli  # in this process; the export below runs the installed console script itself


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    result = subprocess.run(
        [str(BIN / "export-quantized"), "--out", str(out), *FAST], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_export_end_to_end_prints_bundle_parity_and_psnr(cli_bundle):
    out, stdout = cli_bundle
    assert f"bundle:  {out}" in stdout
    assert "preview.png" in stdout and (out / "preview.png").is_file()
    assert stdout.count("PASS") == 2
    assert "PSNR to FP" in stdout
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()


def test_sample_bundle_and_model_with_the_same_seeds(cli_bundle, tmp_path):
    out, _ = cli_bundle
    assert (
        run(
            "stepquant",
            "sample",
            "--bundle",
            out,
            "--n",
            "3",
            "--seed",
            "5",
            "--steps",
            "3",
            "--out",
            tmp_path / "q.npz",
            "--no-progress",
        ).returncode
        == 0
    )
    assert (
        run(
            "stepquant",
            "sample",
            "--model",
            "demo-digits",
            "--n",
            "3",
            "--seed",
            "5",
            "--steps",
            "3",
            "--out",
            tmp_path / "fp.npz",
            "--no-progress",
        ).returncode
        == 0
    )
    quantized, fp = np.load(tmp_path / "q.npz")["samples"], np.load(tmp_path / "fp.npz")["samples"]
    assert quantized.shape == fp.shape == (3, 1, 16, 16) and quantized.dtype == np.float32
    psnr = 10 * np.log10(4.0 / np.mean((quantized - fp) ** 2, axis=(1, 2, 3)))
    assert psnr.min() > 20.0  # same seeds give the same digits
    grid = run("stepquant", "sample", "--bundle", out, "--n", "2", "--out", tmp_path / "g.png", "--no-progress")
    assert grid.returncode == 0 and (tmp_path / "g.png").stat().st_size > 0
    other = run(
        "stepquant", "sample", "--bundle", out, "--n", "2", "--steps", "2", "--out", tmp_path / "o.npz", "--no-progress"
    )
    assert_one_line_error(other, "stores no 2 DDIM steps, eta 0 sampler; it stores ddim:3")


def test_missing_model_directory(tmp_path):
    result = run("export-quantized", "--model", tmp_path / "nope", "--out", tmp_path / "b", *FAST)
    assert_one_line_error(result, "not found")
    assert list(tmp_path.iterdir()) == []


def test_directory_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"\0")
    result = run("export-quantized", "--model", tmp_path / "model", "--out", tmp_path / "b", *FAST)
    assert_one_line_error(result, "not a diffusers model directory")
    assert not (tmp_path / "b").exists()


def test_unwritable_output_path(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    result = run("export-quantized", "--out", tmp_path / "file" / "bundle", *FAST)
    assert_one_line_error(result, "cannot write the bundle")
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o500)
    if subprocess.run(["touch", str(readonly / "probe")]).returncode == 0:
        pytest.skip("running as a user who can write anywhere (root)")
    assert_one_line_error(run("export-quantized", "--out", readonly / "bundle", *FAST), "cannot write the bundle")


def test_unknown_option_value(tmp_path):
    result = run("export-quantized", "--out", tmp_path / "b", "--calibrator", "median", *FAST)
    assert_one_line_error(result, "median")
    assert result.returncode == 2
    assert_one_line_error(
        run("export-quantized", "--out", tmp_path / "b", "--weight-bits", "9", *FAST), "between 2 and 8"
    )
    assert list(tmp_path.iterdir()) == []


def test_tampered_bundle_is_refused(cli_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(cli_bundle[0], copy)
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[100] ^= 0xFF
    model.write_bytes(bytes(data))
    result = run("stepquant", "sample", "--bundle", copy, "--n", "1", "--out", tmp_path / "x.npz", "--no-progress")
    assert_one_line_error(result, "sha256 of model.onnx")
    assert not (tmp_path / "x.npz").exists()


def test_existing_output_needs_overwrite(cli_bundle):
    result = run("export-quantized", "--out", cli_bundle[0], *FAST)
    assert_one_line_error(result, "--overwrite")


def test_eval_writes_json_and_plot(cli_bundle, tmp_path):
    out, _ = cli_bundle
    result = run(
        "stepquant", "eval", "--bundle", out, "--n", "4", "--steps", "3", "--out", tmp_path / "eval", "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    assert "PSNR to FP" in result.stdout and "FD to FP" in result.stdout
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["samples"] == 4 and len(report["step_error"]) == 3 and len(report["accumulated_error"]) == 3
    assert (tmp_path / "eval" / "errors.png").stat().st_size > 0
    assert_one_line_error(run("stepquant", "eval", "--bundle", out, "--n", "1"), "--n")


def test_bench_prints_both_graphs(cli_bundle):
    result = run(
        "stepquant", "bench", "--bundle", cli_bundle[0], "--batch", "2", "--backend", "onnxruntime", "--seconds", "0.2"
    )
    assert result.returncode == 0, result.stderr
    assert (
        "onnxruntime FP32" in result.stdout
        and "tensorrt graph" in result.stdout
        and "x vs onnxruntime FP32" in result.stdout
    )


def test_parity_replay_command(cli_bundle):
    passed = run("stepquant", "parity", "--bundle", cli_bundle[0])
    assert passed.returncode == 0 and "parity: PASS" in passed.stdout and "p99 rel" in passed.stdout
    failed = run("stepquant", "parity", "--bundle", cli_bundle[0], "--rtol", "0")
    assert failed.returncode == 1 and "parity: FAIL" in failed.stdout
