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
from stepquant.export.faults import forge_bundle, point_at_external_data

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
    assert_one_line_error(
        cli("--model", model, "--out", model, "--overwrite", prog="export-quantized"), "model being exported"
    )
    assert_one_line_error(
        cli("--model", model / "unet", "--out", model, "--overwrite", prog="export-quantized"), "model being exported"
    )
    assert (work / "thesis.tex").read_text() == "valuable" and sorted(
        p.relative_to(model) for p in model.rglob("*")
    ) == before


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


def test_a_directory_appearing_at_out_during_the_export_is_kept(tmp_path):
    destination = tmp_path / "b"
    with pytest.raises(BundleError, match="appeared while this export ran"):
        with staged_directory(destination) as staging:
            (staging / "manifest.json").write_text("{}")
            destination.mkdir()  # the user's folder, made while the export runs
            (destination / "thesis.tex").write_text("valuable")
    assert (destination / "thesis.tex").read_text() == "valuable" and sorted(p.name for p in tmp_path.iterdir()) == [
        "b"
    ]


def test_a_bundle_replaced_during_an_overwrite_is_kept(tmp_path, bundle):
    with pytest.raises(BundleError, match="changed while this export ran"):
        with staged_directory(bundle, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            shutil.rmtree(bundle)  # another export replaced it meanwhile
            bundle.mkdir()
            (bundle / "theirs.txt").write_text("another export's")
    assert [p.name for p in bundle.iterdir()] == ["theirs.txt"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "bundle"
    ]


def _stage_and_finish(destination: str, barrier, results) -> None:
    try:
        with staged_directory(Path(destination)) as staging:
            (staging / "who.txt").write_text(str(os.getpid()))
            barrier.wait(timeout=30)  # both staged: now both rename at once
        results.put(("ok", os.getpid()))
    except BundleError as err:
        results.put(("refused", str(err)))


def test_two_exports_into_one_new_out_never_both_succeed(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(20):
        destination = tmp_path / f"b{round_}"
        barrier, results = context.Barrier(2), context.Queue()
        workers = [
            context.Process(target=_stage_and_finish, args=(str(destination), barrier, results)) for _ in range(2)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        outcomes = sorted(results.get(timeout=5) for _ in workers)
        assert [kind for kind, _ in outcomes] == ["ok", "refused"], outcomes
        assert "appeared while this export ran" in outcomes[1][1]
        assert (destination / "who.txt").read_text() == str(outcomes[0][1])  # the winner's bundle, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"b{i}" for i in range(20))  # no staging left


def test_two_export_commands_into_one_out_leave_one_whole_bundle(tiny_model_dir, tmp_path):
    out = tmp_path / "b"
    command = [
        str(BIN / "export-quantized"),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--steps",
        "2",
        "--calib-samples",
        "2",
        "--eval-samples",
        "2",
        "--no-progress",
    ]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    finished = [(process.wait(timeout=600), process.stderr.read()) for process in processes]
    codes = sorted(code for code, _ in finished)
    assert codes[0] == 0 and codes[1] != 0, finished
    error = next(err for code, err in finished if code)
    assert "export-quantized: error:" in error and (
        "appeared while this export ran" in error or "already exists" in error
    )
    assert load_bundle(out, strict=True).manifest and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


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
    forge_bundle(bundle, lambda m: m["samplers"][0].pop("sampler"))
    assert_one_line_error(
        cli("sample", "--bundle", bundle, "--n", "1", "--out", tmp_path / "x.npz"),
        "'sampler' must hold 'scheduler', 'steps'",
    )
    assert not (tmp_path / "x.npz").exists()


def test_a_corrupt_graph_with_matching_hashes_is_one_line(bundle, tmp_path):
    (bundle / "model.onnx").write_bytes(b"\x08\x07garbage")
    forge_bundle(bundle)
    assert_one_line_error(
        cli("sample", "--bundle", bundle, "--n", "1", "--out", tmp_path / "x.npz"), "is not an ONNX graph"
    )


def test_a_well_formed_graph_onnxruntime_refuses_is_one_line(bundle, tmp_path):
    proto = onnx.load(str(bundle / "model.onnx"))
    next(node for node in proto.graph.node if node.op_type == "Conv").op_type = "NoSuchOperator"
    onnx.save(proto, str(bundle / "model.onnx"))
    forge_bundle(bundle)
    assert_one_line_error(
        cli("sample", "--bundle", bundle, "--n", "1", "--out", tmp_path / "x.npz"), "onnxruntime cannot load"
    )


# --- every byte a graph reads is listed and hashed --------------------------------------------------------------


def _graph_edit(bundle: Path, edit) -> None:
    """Edit the bundle's quantized graph with onnx and recompute every hash, as an attacker would."""
    proto = onnx.load(str(bundle / "model.onnx"))
    edit(proto)
    onnx.save(proto, str(bundle / "model.onnx"))
    forge_bundle(bundle)


def test_unlisted_external_data_is_refused_on_both_installs(bundle, tmp_path):
    from test_runtime_install import stepquant_without_export_side

    proto = onnx.load(str(bundle / "model.onnx"))
    onnx.save_model(
        proto, str(bundle / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    forge_bundle(bundle)  # model.onnx rehashed; model.onnx.data not listed, so its bytes could be anything
    fragment = "model.onnx.data, which"  # verify: an unlisted file; sample: a graph reading one
    for command in ("sample", "verify"):
        extra = ("--n", "1", "--out", tmp_path / "x.npz") if command == "sample" else ()
        assert_one_line_error(cli(command, "--bundle", bundle, *extra), fragment)
    assert_one_line_error(
        stepquant_without_export_side("sample", "--bundle", bundle, "--n", "1", "--out", tmp_path / "x.npz"), fragment
    )
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("used", [True, False])
def test_external_data_outside_the_bundle_is_refused_unopened(bundle, tmp_path, used):
    secret = bundle.parent / "secret.bin"
    secret.write_bytes(bytes(4096))
    _graph_edit(bundle, lambda proto: point_at_external_data(proto, "../secret.bin", used))
    for command in ("sample", "verify", "parity"):
        OPENED.clear()
        extra = ("--n", "1", "--out", tmp_path / "x.npz") if command == "sample" else ()
        assert_one_line_error(
            cli(command, "--bundle", bundle, *extra), "reads tensors from '../secret.bin', outside the bundle"
        )
        assert not [p for p in OPENED if "secret" in p]


def test_verify_refuses_unlisted_files_and_every_command_symbolic_links(bundle, tmp_path):
    (bundle / "notes.txt").write_text("not in the manifest")
    assert_one_line_error(cli("verify", "--bundle", bundle), "holds notes.txt, which its manifest does not list")
    (bundle / "notes.txt").unlink()
    (bundle / "elsewhere").symlink_to(tmp_path)  # unlisted and never read: still not the bundle its manifest describes
    for command in ("verify", "sample"):
        extra = ("--n", "1", "--out", tmp_path / "x.npz") if command == "sample" else ()
        assert_one_line_error(cli(command, "--bundle", bundle, *extra), "holds a symbolic link, elsewhere")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -0.1])
def test_a_forged_scale_is_refused_before_a_session_runs(bundle, tmp_path, value):
    def poison(proto):
        scale = next(node.input[1] for node in proto.graph.node if node.op_type == "DequantizeLinear")
        tensor = next(t for t in proto.graph.initializer if t.name == scale)
        array = onnx.numpy_helper.to_array(tensor).copy()
        array.flat[0] = value
        tensor.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), scale))

    _graph_edit(bundle, poison)
    assert_one_line_error(
        cli("sample", "--bundle", bundle, "--n", "1", "--out", tmp_path / "x.npz"), "that is not finite and positive"
    )
    assert not (tmp_path / "x.npz").exists()


# --- forged manifests: checked against the graphs, bounded before parsing ---------------------------------------


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (
            lambda m: m.update(sample_shape=[1, 8, 8]),
            "declares input sample of shape ['batch', 1, 16, 16], the manifest says",
        ),
        (lambda m: m.update(sample_shape=[3, 16, 16]), "declares input sample of shape"),
        (
            lambda m: m["inputs"]["conditions"].append({"name": "encoder_hidden_states", "shape": ["sequence", 8]}),
            "the manifest describes ['encoder_hidden_states', 'sample', 'timestep']",
        ),
        (lambda m: m["inputs"]["shape_profile"]["batch"].update(max=0), "min <= opt <= max"),
    ],
)
def test_manifest_shapes_disagreeing_with_the_graph_are_one_line(bundle, tmp_path, edit, fragment):
    forge_bundle(bundle, edit)
    for command in ("sample", "verify"):
        extra = ("--n", "1", "--out", tmp_path / "x.npz") if command == "sample" else ()
        assert_one_line_error(cli(command, "--bundle", bundle, *extra), fragment)


def test_deeply_nested_json_is_refused_before_parsing(bundle, tmp_path):
    from test_runtime_install import stepquant_without_export_side

    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text('{"deep": ' + "[" * 100_000 + "]" * 100_000 + ", " + text[1:])
    for result in (
        cli("sample", "--bundle", bundle, "--n", "1", "--out", tmp_path / "x.npz"),
        cli("verify", "--bundle", bundle),
        stepquant_without_export_side("verify", "--bundle", bundle),
    ):
        assert_one_line_error(result, "nests values 100001 deep (at most 64)")
    assert_one_line_error(cli("--out", bundle, "--overwrite", prog="export-quantized"), "not a stepquant bundle")
    assert (bundle / "model.onnx").exists()


# --- options that do not apply, out of range, or named wrong ------------------------------------------------------


def test_bench_refuses_a_batch_outside_the_bundles_range(bundle):
    assert_one_line_error(
        cli("bench", "--bundle", bundle, "--batch", "1", "--batch", "100000"),
        "batch 100000 is outside the bundle's batch range 1..64",
    )


@pytest.mark.parametrize("command", ["export", "sample"])
def test_eta_for_a_scheduler_without_one_is_refused(bundle, tmp_path, command):
    args = (
        ["--out", tmp_path / "b"]
        if command == "export"
        else ["sample", "--bundle", bundle, "--out", tmp_path / "x.npz"]
    )
    result = cli(
        *args, "--scheduler", "euler", "--eta", "0.5", prog="export-quantized" if command == "export" else "stepquant"
    )
    assert_one_line_error(result, "--eta 0.5: the euler scheduler has no eta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.parametrize("rtol", ["5", "1", "inf", "nan", "-1"])
def test_parity_rtol_is_a_median_relative_error(bundle, rtol):
    assert_one_line_error(
        cli("parity", "--bundle", bundle, "--rtol", rtol), "'--rtol': must be a median relative error in [0, 1)"
    )


@pytest.mark.parametrize(
    "classes", ["\u0663", "1,\u00b2", "\uff17"]
)  # Arabic-Indic three, superscript two, fullwidth seven
def test_a_non_ascii_digit_in_classes_names_the_option(tmp_path, classes):
    result = cli("sample", "--model", "demo-digits-cond", "--classes", classes, "--n", "1", "--out", tmp_path / "x.npz")
    assert_one_line_error(result, "--classes")
    assert "is not a class index" in result.stderr


# --- what the tool writes: ordinary modes, any legal name, space checked first -----------------------------------


def test_bundle_files_and_sample_outputs_get_ordinary_modes(tiny_model_dir, tmp_path):
    umask = os.umask(0o022)
    try:
        out = tmp_path / "b"
        assert (
            cli(
                "--model",
                tiny_model_dir,
                "--out",
                out,
                "--steps",
                "2",
                "--calib-samples",
                "2",
                "--eval-samples",
                "2",
                "--correction",
                "ptqd",
                "--no-progress",
                prog="export-quantized",
            ).returncode
            == 0
        )
        assert (out / "corrections.safetensors").exists()
        modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in out.rglob("*")}
        assert set(modes.values()) == {"0o644", "0o755"}, modes
        for name in ("x.png", "x.npz"):
            assert cli("sample", "--bundle", out, "--n", "2", "--out", tmp_path / name, "--no-progress").returncode == 0
            assert oct((tmp_path / name).stat().st_mode & 0o777) == "0o644"
    finally:
        os.umask(umask)


def test_a_250_character_out_name_is_written(tmp_path):
    destination = tmp_path / ("b" * 250)
    with staged_directory(destination) as staging:
        (staging / "manifest.json").write_text("{}")
    assert (destination / "manifest.json").exists() and [p.name for p in tmp_path.iterdir()] == [destination.name]


def test_a_full_disk_is_found_before_sampling(bundle, tmp_path, monkeypatch):
    import stepquant.cli.files
    import stepquant.cli.sample

    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(stepquant.cli.files.shutil, "disk_usage", lambda path: free)
    monkeypatch.setattr(
        stepquant.cli.sample, "sample_batches", lambda *a, **k: pytest.fail("sampled before checking space")
    )
    for name in ("x.png", "x.npz"):
        assert_one_line_error(
            cli("sample", "--bundle", bundle, "--n", "64", "--out", tmp_path / name),
            "and the directory has 1,000 bytes free",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


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
    assert_one_line_error(
        cli("sample", "--bundle", bundle, "--n", "1", "--out", tmp_path / "x.npz", "--trust-key", public),
        "signature does not match",
    )  # ...with one it does not
    _, other = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError, match="does not match"):
        load_bundle(bundle, other)
    with pytest.raises(SignatureError, match="never replaced"):
        generate_keypair(keys)


def test_export_signs_with_a_key_and_refuses_an_unreadable_one_first(tiny_model_dir, tmp_path):
    private, public = generate_keypair(tmp_path / "keys")
    fast = ["--model", tiny_model_dir, "--steps", "2", "--calib-samples", "2", "--eval-samples", "2", "--no-progress"]
    assert_one_line_error(
        cli(*fast, "--out", tmp_path / "b", "--sign-key", public, prog="export-quantized"),
        "not an unencrypted PEM private key",
    )
    assert cli(*fast, "--out", tmp_path / "b", "--sign-key", private, prog="export-quantized").returncode == 0
    assert (tmp_path / "b" / SIGNATURE).is_file() and load_bundle(tmp_path / "b", public).signed_by == public


# --- interruptions clean up -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "signum, message, code", [(signal.SIGTERM, "terminated by SIGTERM", 143), (signal.SIGINT, "aborted", 130)]
)
def test_an_interrupted_export_leaves_nothing(tiny_model_dir, tmp_path, signum, message, code):
    process = subprocess.Popen(
        [
            str(BIN / "export-quantized"),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "b"),
            "--steps",
            "25",
            "--calib-samples",
            "64",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # the CLI keeps a SIGINT its parent ignored (as `cmd &` in a script does): start it heeded
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".b.*.partial")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert list(tmp_path.glob(".b.*.partial")), "the export never started staging"
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code and [line for line in err.splitlines() if line.strip()] == [
        f"export-quantized: error: {message}"
    ]
    assert list(tmp_path.iterdir()) == []


# --- wrong values, named, before any work ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--percentile", "0.9999", "--calibrator", "percentile"], "did you mean 99.99"),
        (["--percentile", "-5"], "--percentile must be in (50, 100]"),
        (["--calib-steps", "0"], "--calib-steps must be between 1"),
        (["--calib-steps", "-5"], "--calib-steps must be between 1"),
        (["--steps-per-group", "0"], "--steps-per-group must be between 1"),
        (["--seed", str(2**70)], "--seed must be between 0"),
        (["--recon-scale-lr", "0"], "--recon-scale-lr must be a positive number"),
    ],
)
def test_export_values_are_checked_before_any_work(tmp_path, args, fragment):
    started = time.perf_counter()
    assert_one_line_error(cli("--out", tmp_path / "b", *args, prog="export-quantized"), fragment)
    assert list(tmp_path.iterdir()) == [] and time.perf_counter() - started < 30


def test_sample_checks_its_output_and_values_before_sampling(bundle, tmp_path):
    for args, fragment in (
        (["--out", tmp_path / "x.jpg"], "--out must end in .png or .npz"),
        (["--out", tmp_path / "missing" / "x.npz"], "not an existing directory"),
        (["--out", tmp_path / "x.npz", "--batch-size", "0"], "'--batch-size'"),
        (["--out", tmp_path / "x.npz", "--seed", str(2**70)], "'--seed'"),
        (["--out", tmp_path / "x.npz", "--n", "1000000000"], "GiB free"),
        (["--out", tmp_path / "x.png", "--n", "100000"], "a PNG grid holds at most"),
    ):
        assert_one_line_error(cli("sample", "--bundle", bundle, "--no-progress", *args), fragment)
    assert list(tmp_path.iterdir()) == ["bundle"] or sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


# --- bounded memory ---------------------------------------------------------------------------------------------


def test_samples_stream_to_the_npz_batch_by_batch(bundle, tmp_path):
    result = cli(
        "sample", "--bundle", bundle, "--n", "5", "--batch-size", "2", "--out", tmp_path / "x.npz", "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    samples = np.load(tmp_path / "x.npz")["samples"]
    assert samples.shape == (5, 1, 16, 16) and samples.dtype == np.float32 and np.isfinite(samples).all()


def test_huge_sample_shapes_are_refused_before_allocating(bundle, tiny_model_dir, tmp_path):
    forge_bundle(bundle, lambda m: m.update(sample_shape=[1, 100000, 100000]))
    assert_one_line_error(
        cli("sample", "--bundle", bundle, "--n", "1", "--out", tmp_path / "x.npz"), "values per sample"
    )
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
    assert_one_line_error(
        cli("--model", pickled, "--out", tmp_path / "b", prog="export-quantized"), "loads safetensors only"
    )
    schedule = tmp_path / "schedule"
    shutil.copytree(tiny_model_dir, schedule)
    config_file = schedule / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "beta_schedule": "cubic"}))
    assert_one_line_error(
        cli("sample", "--model", schedule, "--n", "1", "--steps", "2", "--out", tmp_path / "x.npz"),
        "noise schedule cannot drive",
    )
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
    assert (
        cli(
            "--model",
            tiny_model_dir,
            "--out",
            groups,
            "--steps",
            "4",
            "--timestep-groups",
            "2",
            "--calib-samples",
            "2",
            "--eval-samples",
            "2",
            "--no-progress",
            prog="export-quantized",
        ).returncode
        == 0
    )
    linted = cli("lint", groups)
    assert linted.returncode == 0 and linted.stdout.count("conforms") == 2
    assert "model_g0.onnx" in linted.stdout and "model_g1.onnx" in linted.stdout
    assert onnx.load(str(groups / "model_g1.onnx")).graph.node
