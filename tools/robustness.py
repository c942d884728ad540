"""Hostile and bad inputs, as a new user (or someone handing over a bundle) would supply them, each run through
the commands in this process. A case holds when the command exits non-zero with one line naming the problem
(the expected fragment), prints no traceback, writes or deletes nothing (the whole sandbox is compared before
and after; what a case itself makes while the command runs must be left as it made it), and opens no file
outside the bundle (Python's audit hook records every open).

    python tools/robustness.py [--no-write] [--only CATEGORY]

Interruptions (signals) and two exports racing for one --out need processes of their own and are tested in
tests/test_safety.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from benchdoc import header, write_section
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from stepquant.bundle.signing import generate_keypair
from stepquant.cli.main import invoke
from stepquant.export.faults import forge_bundle, point_at_external_data
from stepquant.models.demo_config import SCHEDULER_CONFIG
from stepquant.models.tiny import TINY_PROMPTS, save_tiny_text_pipeline

OPENED: list[str] = []  # what a case's command opened: recorded only while one runs
RECORDING = threading.Event()
_HOOKED = False
TINY_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=16,
)
FAST = ["--steps", "2", "--calib-samples", "2", "--eval-samples", "2", "--no-progress"]


def _audit(event: str, args) -> None:
    if event == "open" and RECORDING.is_set() and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.path.abspath(os.fsdecode(args[0])))


def watch_opens() -> None:
    """Install the audit hook that records opens (once per process: Python cannot remove one)."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True


@dataclass
class Case:
    category: str
    name: str
    args: list[str]  # {root}, {case} and {bundle} are filled in
    expect: str  # the fragment the error line must hold
    prog: str = "stepquant"
    setup: Callable[[Path, Path], None] | None = None  # (sandbox root, this case's directory)
    forbidden: list[str] = field(default_factory=list)  # paths under the root that must never be opened
    during: Callable[[Path], dict[str, bytes]] | None = None  # run beside the command: the files it made, to be kept


def _copy_bundle(
    root: Path,
    case: Path,
    edit: Callable[[dict], None] | None = None,
    files: Callable[[Path], None] | None = None,
    rehash: bool = True,
    rehash_files: bool = True,
    source: str = "bundle",
) -> Path:
    bundle = case / "bundle"
    shutil.copytree(root / source, bundle)
    if files:
        files(bundle)
    if rehash:
        forge_bundle(bundle, edit, rehash_files)
    return bundle


def bundle_case(
    name: str,
    expect: str,
    edit=None,
    files=None,
    rehash=True,
    rehash_files=True,
    args=("sample", "--bundle", "{bundle}", "--n", "1", "--out", "{case}/x.npz"),
    forbidden=("secret.txt", "evil.onnx"),
) -> Case:
    return Case(
        "bundle from elsewhere",
        name,
        list(args),
        expect,
        setup=lambda root, case: _copy_bundle(root, case, edit, files, rehash, rehash_files),
        forbidden=list(forbidden),
    )


def text_case(name: str, expect: str, args: list[str], edit=None, files=None, rehash=True) -> Case:
    """A `stepquant generate` case on a copy of the sandbox's whole-pipeline bundle (edited as `bundle_case`)."""
    return Case(
        "text-to-image",
        name,
        ["generate", "--bundle", "{bundle}", "--no-progress", *args],
        expect,
        setup=lambda root, case: _copy_bundle(root, case, edit, files, rehash, source="t2i"),
        forbidden=["secret.txt", "evil.onnx"],
    )


def _vae_channels(bundle: Path) -> None:
    proto = onnx.load(str(bundle / "vae_decoder" / "model.onnx"))
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    onnx.save(proto, str(bundle / "vae_decoder" / "model.onnx"))


def _cut_parity_sample(bundle: Path) -> None:
    from polygraphy.json import load_json, save_json

    feeds = load_json(bundle / "parity" / "inputs.json")
    feeds[0]["sample"] = feeds[0]["sample"][:, :, :8]
    save_json(feeds, bundle / "parity" / "inputs.json")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _symlink(bundle: Path, name: str) -> None:
    target = bundle.parent / f"moved-{name.replace('/', '-')}"
    shutil.move(bundle / name, target)
    (bundle / name).symlink_to(target)


def _graph_edit(edit: Callable[[onnx.ModelProto], None]) -> Callable[[Path], None]:
    """Edit the bundle's quantized graph with onnx (the hashes are recomputed afterwards, as an attacker would)."""

    def files(bundle: Path) -> None:
        proto = onnx.load(str(bundle / "model.onnx"))
        edit(proto)
        onnx.save(proto, str(bundle / "model.onnx"))

    return files


def _external(location: str, used: bool = True) -> Callable[[onnx.ModelProto], None]:
    return lambda proto: point_at_external_data(proto, location, used)


def _scale(value: float) -> Callable[[onnx.ModelProto], None]:
    """Set the first element of the first DequantizeLinear's scale to `value`."""

    def edit(proto: onnx.ModelProto) -> None:
        name = next(node.input[1] for node in proto.graph.node if node.op_type == "DequantizeLinear")
        tensor = next(t for t in proto.graph.initializer if t.name == name)
        array = onnx.numpy_helper.to_array(tensor).astype("float32")
        array.flat[0] = value
        tensor.CopyFrom(onnx.numpy_helper.from_array(array, name))

    return edit


def _unlisted_external_data(bundle: Path) -> None:
    proto = onnx.load(str(bundle / "model.onnx"))
    onnx.save_model(
        proto, str(bundle / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )


def _deep_manifest(bundle: Path) -> None:
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text('{"deep": ' + "[" * 100_000 + "]" * 100_000 + ", " + text[1:])


def _appears_at(name: str) -> Callable[[Path], dict[str, bytes]]:
    """Once the export is staging beside `case/name`, make `case/name` a user's folder holding a file."""

    def during(case: Path) -> dict[str, bytes]:
        deadline = time.monotonic() + 120
        while not list(case.glob(f".{name}.*.partial")) and time.monotonic() < deadline:
            time.sleep(0.01)
        (case / name).mkdir()
        (case / name / "thesis.tex").write_bytes(b"valuable")
        return {f"{name}/thesis.tex": b"valuable"}

    return during


def _group(manifest: dict) -> dict:
    return manifest["targets"]["tensorrt"]["timestep_groups"][0]


def _write(relative: str, content: bytes | str) -> Callable[[Path, Path], None]:
    def setup(root: Path, case: Path) -> None:
        path = case / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def _model(edit: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    def setup(root: Path, case: Path) -> None:
        shutil.copytree(root / "model", case / "model")
        edit(case / "model")

    return setup


def _json_edit(relative: str, **changes) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        path = model / relative
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return edit


def _pickled(model: Path) -> None:
    from safetensors.torch import load_file

    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()


def cases() -> list[Case]:
    export = [
        ("--out '' with --overwrite", ["--out", "", "--overwrite"], "current directory"),
        ("--out . with --overwrite", ["--out", ".", "--overwrite"], "current directory"),
        ("--out the sandbox holding the working directory", ["--out", "{root}", "--overwrite"], "current directory"),
        (
            "--out equal to --model",
            ["--model", "{root}/model", "--out", "{root}/model", "--overwrite"],
            "model being exported",
        ),
        (
            "--out a parent of --model",
            ["--model", "{root}/model/unet", "--out", "{root}/model", "--overwrite"],
            "model being exported",
        ),
        (
            "--out inside --model, overwriting its unet",
            ["--model", "{root}/model", "--out", "{root}/model/unet", "--overwrite"],
            "not a stepquant bundle",
        ),
        ("--out a directory that is not a bundle", ["--out", "{root}/work", "--overwrite"], "current directory"),
        ("--out photos, not a bundle", ["--out", "{case}/photos", "--overwrite"], "not a stepquant bundle"),
        ("--out an existing file", ["--out", "{case}/photos/a.jpg", "--overwrite"], "not a directory"),
        ("--out a symbolic link", ["--out", "{case}/link", "--overwrite"], "symbolic link"),
        ("--out an existing bundle without --overwrite", ["--out", "{root}/bundle"], "--overwrite"),
        ("--out in a missing directory", ["--out", "{case}/missing/b"], "not an existing directory"),
        (
            "--percentile as a fraction",
            ["--out", "{case}/b", "--calibrator", "percentile", "--percentile", "0.9999"],
            "did you mean 99.99",
        ),
        ("--percentile negative", ["--out", "{case}/b", "--percentile", "-5"], "--percentile"),
        ("--percentile over 100", ["--out", "{case}/b", "--percentile", "101"], "--percentile"),
        ("--percentile nan", ["--out", "{case}/b", "--percentile", "nan"], "--percentile"),
        ("--calib-steps 0", ["--out", "{case}/b", "--calib-steps", "0"], "--calib-steps"),
        ("--calib-steps -5", ["--out", "{case}/b", "--calib-steps", "-5"], "--calib-steps"),
        ("--calib-steps over --steps", ["--out", "{case}/b", "--calib-steps", "1000"], "--calib-steps"),
        ("--steps-per-group 0", ["--out", "{case}/b", "--steps-per-group", "0"], "--steps-per-group"),
        ("--steps-per-group over --steps", ["--out", "{case}/b", "--steps-per-group", "999"], "--steps-per-group"),
        ("--steps 0", ["--out", "{case}/b", "--steps", "0"], "--steps"),
        ("--steps -1", ["--out", "{case}/b", "--steps", "-1"], "--steps"),
        ("--steps text", ["--out", "{case}/b", "--steps", "many"], "--steps"),
        ("--eta 2", ["--out", "{case}/b", "--eta", "2"], "--eta"),
        ("--eta nan", ["--out", "{case}/b", "--eta", "nan"], "--eta"),
        ("--guidance-scale -1", ["--out", "{case}/b", "--guidance-scale", "-1"], "--guidance-scale"),
        ("--guidance-scale inf", ["--out", "{case}/b", "--guidance-scale", "inf"], "--guidance-scale"),
        ("--seed -1", ["--out", "{case}/b", "--seed", "-1"], "--seed"),
        ("--seed 2**70", ["--out", "{case}/b", "--seed", str(2**70)], "--seed"),
        ("--calib-samples 0", ["--out", "{case}/b", "--calib-samples", "0"], "--calib-samples"),
        ("--eval-samples 0", ["--out", "{case}/b", "--eval-samples", "0"], "--eval-samples"),
        ("--weight-bits 9", ["--out", "{case}/b", "--weight-bits", "9"], "between 2 and 8"),
        ("--act-bits 1", ["--out", "{case}/b", "--act-bits", "1"], "between 2 and 8"),
        ("--weight-bits text", ["--out", "{case}/b", "--weight-bits", "eight"], "--weight-bits"),
        ("--format int4", ["--out", "{case}/b", "--format", "int4"], "--format"),
        ("--target unknown", ["--out", "{case}/b", "--target", "coreml"], "--target"),
        ("--target twice", ["--out", "{case}/b", "--target", "tensorrt", "--target", "tensorrt"], "distinct"),
        ("--precision fp64", ["--out", "{case}/b", "--precision", "fp64"], "--precision"),
        (
            "--precision fp16 with --format fp8",
            ["--out", "{case}/b", "--precision", "fp16", "--format", "fp8"],
            "fp16 is for int8",
        ),
        (
            "onnxruntime-cpu with fp8",
            ["--out", "{case}/b", "--target", "onnxruntime-cpu", "--format", "fp8"],
            "onnxruntime-cpu",
        ),
        ("--calibrator unknown", ["--out", "{case}/b", "--calibrator", "median"], "--calibrator"),
        ("--correction unknown", ["--out", "{case}/b", "--correction", "magic"], "--correction"),
        ("--timestep-groups 0", ["--out", "{case}/b", "--timestep-groups", "0"], "--timestep-groups"),
        ("--timestep-groups over --steps", ["--out", "{case}/b", "--timestep-groups", "999"], "--timestep-groups"),
        (
            "--timestep-groups with --steps-per-group",
            ["--out", "{case}/b", "--timestep-groups", "2", "--steps-per-group", "2"],
            "not both",
        ),
        ("--recon-iters 0", ["--out", "{case}/b", "--recon-iters", "0"], "--recon-iters"),
        ("--recon-scale-lr 0", ["--out", "{case}/b", "--recon-scale-lr", "0"], "--recon-scale-lr"),
        ("--recon-scale-lr -1", ["--out", "{case}/b", "--recon-scale-lr", "-1"], "--recon-scale-lr"),
        ("--multistep-steps 0", ["--out", "{case}/b", "--multistep-steps", "0"], "--multistep-steps"),
        ("--batch-range 0:1:2", ["--out", "{case}/b", "--batch-range", "0:1:2"], "1 <= min <= opt <= max"),
        ("--batch-range 8:4:16", ["--out", "{case}/b", "--batch-range", "8:4:16"], "1 <= min <= opt <= max"),
        ("--batch-range text", ["--out", "{case}/b", "--batch-range", "large"], "min:opt:max"),
        (
            "--height-range not a multiple of the downsampling",
            ["--out", "{case}/b", "--height-range", "6:8:8"],
            "not a multiple of 4",
        ),
        ("--exclude not a regex", ["--out", "{case}/b", "--exclude", "conv("], "regular expression"),
        (
            "--prompts-file and --conditioning",
            ["--out", "{case}/b", "--prompts-file", "{case}/p.txt", "--conditioning", "{case}/c.safetensors"],
            "not --prompts-file and --conditioning",
        ),
        (
            "--classes for an unconditional model",
            ["--out", "{case}/b", "--classes", "1"],
            "unconditional: drop --classes",
        ),
        ("--classes not integers", ["--out", "{case}/b", "--classes", "1,seven"], "'seven' is not a class index"),
        (
            "--classes out of range",
            ["--model", "demo-digits-cond", "--out", "{case}/b", "--classes", "3,10"],
            "class 10 is out of range",
        ),
        (
            "--classes with --prompts-file",
            ["--model", "demo-digits-cond", "--out", "{case}/b", "--classes", "3", "--prompts-file", "{case}/p.txt"],
            "not --prompts-file and --classes",
        ),
        (
            "--device not a device",
            ["--out", "{case}/b", "--device", "gpu"],
            "--device must be auto, cpu, cuda or cuda:N",
        ),
        (
            "--device cuda:99 (a GPU this machine lacks)",
            ["--out", "{case}/b", "--device", "cuda:99"],
            "--device cuda:99: ",
        ),
        ("--dtype float64", ["--out", "{case}/b", "--dtype", "float64"], "float64"),
        ("--calib-batch 0", ["--out", "{case}/b", "--calib-batch", "0"], "--calib-batch must be at least 1"),
        (
            "--conditioning for an unconditional model",
            ["--out", "{case}/b", "--conditioning", "{case}/none.safetensors"],
            "unconditional",
        ),
        ("--sign-key missing", ["--out", "{case}/b", "--sign-key", "{case}/none.key"], "not found"),
        ("--sign-key a public key", ["--out", "{case}/b", "--sign-key", "{root}/keys/signing.pub"], "private key"),
        ("--sign-key garbage", ["--out", "{case}/b", "--sign-key", "{case}/garbage.key"], "private key"),
        ("--model missing", ["--model", "{case}/nope", "--out", "{case}/b"], "not found"),
        ("--model a file", ["--model", "{case}/garbage.key", "--out", "{case}/b"], "is a file"),
        (
            "--model not a diffusers directory",
            ["--model", "{case}", "--out", "{case}/b"],
            "not a diffusers model directory",
        ),
        ("--model with pickle weights", ["--model", "{case}/model", "--out", "{case}/b"], "safetensors only"),
        (
            "--model with an unknown beta_schedule",
            ["--model", "{case}/model", "--out", "{case}/b", *FAST],
            "noise schedule",
        ),
        ("--model with sample_size 65536", ["--model", "{case}/model", "--out", "{case}/b"], "sample shape"),
        ("--model with a corrupt config.json", ["--model", "{case}/model", "--out", "{case}/b"], "cannot read"),
        ("--model of an unsupported class", ["--model", "{case}/model", "--out", "{case}/b"], "supported:"),
        ("--engine without TensorRT", ["--out", "{case}/b", "--engine"], "TensorRT is not installed"),
        (
            "--eta for a scheduler without one",
            ["--out", "{case}/b", "--scheduler", "euler", "--eta", "0.5"],
            "has no eta",
        ),
        (
            "--classes with a non-ASCII digit",
            ["--model", "demo-digits-cond", "--out", "{case}/b", "--classes", "\u0663"],
            "--classes",
        ),
        (
            "--overwrite onto a deeply nested manifest",
            ["--out", "{case}/bundle", "--overwrite"],
            "not a stepquant bundle",
        ),
    ]
    setups = {
        "--out photos, not a bundle": _write("photos/a.jpg", b"\xff\xd8"),
        "--out an existing file": _write("photos/a.jpg", b"\xff\xd8"),
        "--out a symbolic link": lambda root, case: (case / "link").symlink_to(root / "bundle"),
        "--sign-key garbage": _write("garbage.key", "-----BEGIN PRIVATE KEY-----\nnot base64\n"),
        "--model a file": _write("garbage.key", "x"),
        "--model with pickle weights": _model(_pickled),
        "--model with an unknown beta_schedule": _model(
            _json_edit("scheduler/scheduler_config.json", beta_schedule="cubic")
        ),
        "--model with sample_size 65536": _model(_json_edit("unet/config.json", sample_size=65536)),
        "--model with a corrupt config.json": _model(lambda m: (m / "unet" / "config.json").write_text("{not json")),
        "--model of an unsupported class": _model(_json_edit("unet/config.json", _class_name="VQModel")),
        "--overwrite onto a deeply nested manifest": lambda root, case: _copy_bundle(
            root, case, files=_deep_manifest, rehash=False
        ),
    }
    found = [
        Case("export options and models", name, args, expect, prog="export-quantized", setup=setups.get(name))
        for name, args, expect in export
    ]
    found += [
        Case(
            "export options and models",
            "a folder made at --out while the export runs",
            ["--out", "{case}/b", *FAST],
            "appeared while this export ran",
            prog="export-quantized",
            during=_appears_at("b"),
        )
    ]

    sample = [
        ("--out .jpg", ["--out", "{case}/x.jpg"], "--out must end in"),
        ("--out in a missing directory", ["--out", "{case}/missing/x.npz"], "not an existing directory"),
        ("--out a directory", ["--out", "{case}/dir.npz"], "is a directory"),
        ("--n 0", ["--n", "0", "--out", "{case}/x.npz"], "'--n'"),
        ("--n 10**9 into an .npz", ["--n", "1000000000", "--out", "{case}/x.npz"], "GiB free"),
        ("--n 10**5 into a PNG grid", ["--n", "100000", "--out", "{case}/x.png"], "PNG grid holds at most"),
        ("--batch-size 0", ["--batch-size", "0", "--out", "{case}/x.npz"], "'--batch-size'"),
        ("--seed -1", ["--seed", "-1", "--out", "{case}/x.npz"], "'--seed'"),
        ("--seed 2**70", ["--seed", str(2**70), "--out", "{case}/x.npz"], "'--seed'"),
        ("--seed + --n past the largest seed", ["--seed", str(2**62), "--n", "2", "--out", "{case}/x.npz"], "--seed"),
        ("--steps 0", ["--steps", "0", "--out", "{case}/x.npz"], "'--steps'"),
        ("--eta 5", ["--eta", "5", "--out", "{case}/x.npz"], "--eta"),
        ("--threads 0", ["--threads", "0", "--out", "{case}/x.npz"], "'--threads'"),
        ("--guidance-scale -1", ["--guidance-scale", "-1", "--out", "{case}/x.npz"], "--guidance-scale"),
        (
            "--backend tensorrt without TensorRT",
            ["--backend", "tensorrt", "--out", "{case}/x.npz"],
            "TensorRT is not installed",
        ),
        (
            "--decode-with on a pixel-space bundle",
            ["--decode-with", "{case}/nope", "--out", "{case}/x.npz"],
            "drop --decode-with",
        ),
        (
            "--conditioning for an unconditional bundle",
            ["--conditioning", "{case}/c.safetensors", "--out", "{case}/x.npz"],
            "unconditional: drop --conditioning",
        ),
        (
            "--classes for an unconditional bundle",
            ["--classes", "2", "--out", "{case}/x.npz"],
            "unconditional: drop --classes",
        ),
        (
            "--eta for a scheduler without one",
            ["--scheduler", "ddpm", "--eta", "0.5", "--out", "{case}/x.npz"],
            "has no eta",
        ),
    ]
    sample_setups = {
        "--out a directory": lambda root, case: (case / "dir.npz").mkdir(),
        "--conditioning for an unconditional bundle": _write("c.safetensors", b"not safetensors"),
    }
    found += [
        Case(
            "sample options",
            name,
            ["sample", "--bundle", "{root}/bundle", "--no-progress", *args],
            expect,
            setup=sample_setups.get(name),
        )
        for name, args, expect in sample
    ]
    found += [
        Case(
            "sample options",
            "--bundle and --model",
            ["sample", "--bundle", "{root}/bundle", "--model", "demo-digits", "--out", "{case}/x.npz"],
            "exactly one",
        ),
        Case("sample options", "neither --bundle nor --model", ["sample", "--out", "{case}/x.npz"], "exactly one"),
        Case(
            "sample options",
            "--model with --backend tensorrt",
            ["sample", "--model", "demo-digits", "--backend", "tensorrt", "--out", "{case}/x.npz"],
            "--backend",
        ),
        Case(
            "sample options",
            "--model demo-digits-cond with a class out of range",
            ["sample", "--model", "demo-digits-cond", "--classes", "11", "--out", "{case}/x.npz"],
            "class 11 is out of range",
        ),
        Case(
            "sample options",
            "--bundle missing",
            ["sample", "--bundle", "{case}/nope", "--out", "{case}/x.npz"],
            "not found",
        ),
        Case(
            "sample options",
            "--bundle not a bundle",
            ["sample", "--bundle", "{case}", "--out", "{case}/x.npz"],
            "not a stepquant bundle",
        ),
        Case(
            "sample options",
            "--classes with a non-ASCII digit",
            ["sample", "--model", "demo-digits-cond", "--classes", "1,\u00b2", "--out", "{case}/x.npz"],
            "--classes",
        ),
    ]

    secret = {
        "../secret.txt": "outside the bundle",
        "/etc/hostname": "outside the bundle",
        "parity/../../secret.txt": "outside the bundle",
        "parity\\..\\..\\secret.txt": "invalid file name",
        "": "invalid file name",
        "./model.onnx": "plain relative path",
        "model.onnx/": "plain relative path",
    }
    found += [
        bundle_case(f"files entry {name!r}", expect, edit=lambda m, n=name: m["files"].update({n: _sha(b"s")}))
        for name, expect in secret.items()
    ]
    found += [
        bundle_case(
            "graph outside the bundle",
            "every graph must be a listed file",
            edit=lambda m: _group(m).update(graph="../evil.onnx"),
        ),
        bundle_case(
            "graph at an absolute path",
            "every graph must be a listed file",
            edit=lambda m: _group(m).update(graph="/tmp/evil.onnx"),
        ),
        bundle_case(
            "reference graph outside",
            "'reference_graph' must be a listed file",
            edit=lambda m: m.update(reference_graph="../evil.onnx"),
        ),
        bundle_case(
            "correction file outside",
            "'correction_file'",
            edit=lambda m: m["samplers"][0].update(correction_file="../secret.txt"),
        ),
        bundle_case(
            "parity data outside", "parity data must be listed files", edit=lambda m: _group(m).update(parity="..")
        ),
        bundle_case("graph a symbolic link", "symbolic link", files=lambda b: _symlink(b, "model.onnx")),
        bundle_case("parity directory a symbolic link", "symbolic link", files=lambda b: _symlink(b, "parity")),
        bundle_case(
            "manifest a symbolic link", "symbolic link", files=lambda b: _symlink(b, "manifest.json"), rehash=False
        ),
        bundle_case("manifest without 'samplers'", "'samplers'", edit=lambda m: m.pop("samplers")),
        bundle_case("no sampler stored", "'samplers'", edit=lambda m: m.update(samplers=[])),
        bundle_case("a sampler stored twice", "a sampler twice", edit=lambda m: m["samplers"].append(m["samplers"][0])),
        bundle_case(
            "a sampler without its table", "'scheduler_table'", edit=lambda m: m["samplers"][0].pop("scheduler_table")
        ),
        bundle_case("manifest without 'targets'", "'targets'", edit=lambda m: m.pop("targets")),
        bundle_case("manifest without 'files'", "'files'", edit=lambda m: m.pop("files")),
        bundle_case(
            "sample_shape 100000 x 100000",
            "values per sample",
            edit=lambda m: m.update(sample_shape=[1, 100000, 100000]),
        ),
        bundle_case(
            "sample_shape negative", "three positive integers", edit=lambda m: m.update(sample_shape=[1, -16, 16])
        ),
        bundle_case(
            "sample_shape strings", "three positive integers", edit=lambda m: m.update(sample_shape=["1", "16", "16"])
        ),
        bundle_case("steps a string", "'sampler'", edit=lambda m: m["samplers"][0]["sampler"].update(steps="25")),
        bundle_case(
            "no timestep groups",
            "'timestep_groups'",
            edit=lambda m: m["targets"]["tensorrt"].update(timestep_groups=[]),
        ),
        bundle_case("timesteps a string", "'timesteps'", edit=lambda m: _group(m).update(timesteps="some")),
        bundle_case(
            "optimisation level bogus",
            "optimisation levels",
            edit=lambda m: m["targets"]["tensorrt"].update(onnxruntime_optimization_level="fastest"),
        ),
        bundle_case(
            "replay tolerance missing",
            "end-to-end tolerance",
            edit=lambda m: m["targets"]["tensorrt"]["parity"].pop("end_to_end"),
        ),
        bundle_case(
            "a digest that is not sha256",
            "sha256 digests",
            edit=lambda m: m["files"].update({"model.onnx": "abc"}),
            rehash_files=False,
        ),
        bundle_case("format version 99", "format version 99", edit=lambda m: m.update(format_version=99)),
        bundle_case(
            "manifest edited, hash stale",
            "self-hash",
            files=lambda b: (b / "manifest.json").write_text(
                (b / "manifest.json").read_text().replace('"steps": 4', '"steps": 40')
            ),
            rehash=False,
        ),
        bundle_case(
            "a changed byte, hash stale",
            "sha256 of model.onnx",
            rehash=False,
            files=lambda b: (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes()[:-1] + b"\0"),
        ),
        bundle_case("a listed file missing", "is missing", files=lambda b: (b / "preview.png").unlink(), rehash=False),
        bundle_case(
            "a corrupt graph, hashes recomputed",
            "is not an ONNX graph",
            files=lambda b: (b / "model.onnx").write_bytes(b"\x08\x07garbage"),
        ),
        bundle_case(
            "a well-formed graph onnxruntime refuses, hashes recomputed",
            "onnxruntime cannot load",
            files=_graph_edit(
                lambda proto: setattr(
                    next(n for n in proto.graph.node if n.op_type == "Conv"), "op_type", "NoSuchOperator"
                )
            ),
        ),
        bundle_case(
            "manifest not JSON", "not valid JSON", files=lambda b: (b / "manifest.json").write_text("{"), rehash=False
        ),
        bundle_case(
            "manifest a JSON list",
            "format version",
            files=lambda b: (b / "manifest.json").write_text("[]"),
            rehash=False,
        ),
        bundle_case(
            "manifest over 64 MiB",
            "64 MiB",
            rehash=False,
            files=lambda b: (b / "manifest.json").write_bytes(b" " * (64 * 2**20 + 1)),
        ),
        bundle_case(
            "parity inputs of the wrong shape",
            "outside the graph's inputs",
            args=("parity", "--bundle", "{bundle}"),
            files=_cut_parity_sample,
        ),
        bundle_case(
            "parity inputs not a list",
            "not a list of feed dicts",
            args=("parity", "--bundle", "{bundle}"),
            files=lambda b: (b / "parity" / "inputs.json").write_text("{}"),
        ),
        bundle_case(
            "parity inputs not JSON",
            "unreadable parity data",
            args=("parity", "--bundle", "{bundle}"),
            files=lambda b: (b / "parity" / "inputs.json").write_text("]["),
        ),
        bundle_case(
            "lint a bundle whose graph is outside",
            "every graph must be a listed file",
            args=("lint", "{bundle}"),
            edit=lambda m: _group(m).update(graph="../evil.onnx"),
        ),
    ]
    verify = ("verify", "--bundle", "{bundle}")
    for command, args in (("sample", None), ("verify", verify), ("parity", ("parity", "--bundle", "{bundle}"))):
        extra = {} if args is None else {"args": args}
        found += [
            bundle_case(
                f"{command}: external data not listed", "model.onnx.data, which", files=_unlisted_external_data, **extra
            ),
            bundle_case(
                f"{command}: external data outside the bundle",
                "outside the bundle",
                files=_graph_edit(_external("../../../secret.txt")),
                **extra,
            ),
            bundle_case(
                f"{command}: an unused external reference outside",
                "outside the bundle",
                files=_graph_edit(_external("../../../secret.txt", used=False)),
                **extra,
            ),
            bundle_case(
                f"{command}: external data at an absolute path",
                "outside the bundle",
                files=_graph_edit(_external("/etc/hostname")),
                **extra,
            ),
            bundle_case(
                f"{command}: an unlisted symbolic link",
                "symbolic link",
                files=lambda b: (b / "elsewhere").symlink_to(b.parent),
                **extra,
            ),
            bundle_case(
                f"{command}: a NaN scale, re-hashed",
                "not finite and positive",
                files=_graph_edit(_scale(float("nan"))),
                **extra,
            ),
            bundle_case(
                f"{command}: a sample_shape wrong for the graph",
                "declares input sample",
                edit=lambda m: m.update(sample_shape=[1, 8, 8]),
                **extra,
            ),
            bundle_case(
                f"{command}: a deeply nested manifest", "nests values", files=_deep_manifest, rehash=False, **extra
            ),
        ]
    found += [
        bundle_case("a zero scale, re-hashed", "not finite and positive", files=_graph_edit(_scale(0.0))),
        bundle_case(
            "a condition input the graph lacks",
            "the manifest describes",
            edit=lambda m: m["inputs"]["conditions"].append(
                {"name": "encoder_hidden_states", "shape": ["sequence", 8]}
            ),
        ),
        bundle_case(
            "a shape profile with max 0",
            "min <= opt <= max",
            edit=lambda m: m["inputs"]["shape_profile"]["batch"].update(max=0),
        ),
        bundle_case(
            "verify: an unlisted file",
            "which its manifest does not list",
            args=verify,
            files=lambda b: (b / "notes.txt").write_text("not in the manifest"),
        ),
    ]

    out = ["--out", "{case}/x.png"]
    found += [
        Case(
            "text-to-image",
            "--prompt on a denoiser-only bundle",
            ["generate", "--bundle", "{root}/bundle", "--prompt", "a cat", *out],
            "has no tokenizer or text encoder",
        ),
        text_case("no prompt", "no prompt given", out),
        text_case(
            "an empty prompts file",
            "holds no prompts",
            ["--prompts-file", "{case}/bundle/../empty.txt", *out],
            files=lambda b: (b.parent / "empty.txt").write_text("\n\n"),
        ),
        text_case("--prompt and --prompts-file", "not both", ["--prompt", "a", "--prompts-file", "{case}/p.txt", *out]),
        text_case(
            "--out a folder holding a file",
            "is not an empty folder",
            ["--prompt", "a", "--out", "{case}/photos"],
            files=lambda b: ((b.parent / "photos").mkdir(), (b.parent / "photos" / "a.jpg").write_bytes(b"\xff")),
        ),
        text_case(
            "--out in a missing directory", "not an existing directory", ["--prompt", "a", "--out", "{case}/no/x.png"]
        ),
        text_case("--n 0", "'--n'", ["--prompt", "a", "--n", "0", *out]),
        text_case(
            "--graph reference with --backend tensorrt",
            "has no TensorRT engine",
            ["--prompt", "a", "--graph", "reference", "--backend", "tensorrt", *out],
        ),
        text_case(
            "a tokenizer byte changed, hash stale",
            "sha256 of tokenizer/tokenizer.json",
            ["--prompt", "a", *out],
            files=lambda b: (b / "tokenizer" / "tokenizer.json").write_text(
                (b / "tokenizer" / "tokenizer.json").read_text() + " "
            ),
            rehash=False,
        ),
        text_case(
            "a VAE of 3-channel latents, re-hashed", "4-channel latents", ["--prompt", "a", *out], files=_vae_channels
        ),
        text_case(
            "a zero scaling factor, re-hashed",
            "positive scaling_factor",
            ["--prompt", "a", *out],
            edit=lambda m: m["text_to_image"]["vae_decoder"].update(scaling_factor=0),
        ),
        text_case(
            "a tokenizer outside the bundle",
            "must name listed files",
            ["--prompt", "a", *out],
            edit=lambda m: m["text_to_image"]["encoders"][0].update(tokenizer="../secret.txt"),
        ),
        text_case(
            "a text encoder taking other inputs",
            "not input_ids",
            ["--prompt", "a", *out],
            files=lambda b: shutil.copyfile(b / "vae_decoder" / "model.onnx", b / "text_encoder" / "model.onnx"),
        ),
        Case(
            "text-to-image",
            "export a pipeline with a tokenizer but no text encoder",
            ["--model", "{case}/pipe", "--conditioning", "{case}/c.safetensors", "--out", "{case}/b", *FAST],
            "has a tokenizer but no text_encoder",
            prog="export-quantized",
            setup=lambda root, case: (
                shutil.copytree(root / "pipe", case / "pipe"),
                shutil.rmtree(case / "pipe" / "text_encoder"),
            ),
        ),
    ]

    def signed(root: Path, case: Path, forge_after: bool = False, signature: bytes | None = None) -> None:
        bundle = _copy_bundle(root, case)
        invoke("stepquant", ["sign", "--bundle", bundle, "--key", root / "keys" / "signing.key"])
        if forge_after:
            (bundle / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes()[:-1] + b"\1")
            forge_bundle(bundle)
        if signature is not None:
            (bundle / "manifest.sig").write_bytes(signature)

    trust = ["--trust-key", "{root}/keys/signing.pub"]
    found += [
        Case(
            "signatures",
            "unsigned bundle, trusted key given",
            ["sample", "--bundle", "{bundle}", "--n", "1", "--out", "{case}/x.npz", *trust],
            "not signed",
            setup=lambda root, case: _copy_bundle(root, case),
        ),
        Case(
            "signatures",
            "signed, then a file changed and every hash recomputed",
            ["verify", "--bundle", "{bundle}", *trust],
            "signature does not match",
            setup=lambda root, case: signed(root, case, forge_after=True),
        ),
        Case(
            "signatures",
            "signed, then sampled with the changed file",
            ["sample", "--bundle", "{bundle}", "--n", "1", "--out", "{case}/x.npz", *trust],
            "signature does not match",
            setup=lambda root, case: signed(root, case, forge_after=True),
        ),
        Case(
            "signatures",
            "signature not base64",
            ["verify", "--bundle", "{bundle}", *trust],
            "signature does not match",
            setup=lambda root, case: signed(root, case, signature=b"%%%"),
        ),
        Case(
            "signatures",
            "signature of 64 random bytes",
            ["verify", "--bundle", "{bundle}", *trust],
            "signature does not match",
            setup=lambda root, case: signed(root, case, signature=__import__("base64").b64encode(os.urandom(64))),
        ),
        Case(
            "signatures",
            "signed by another key",
            ["verify", "--bundle", "{bundle}", "--trust-key", "{root}/other/signing.pub"],
            "signature does not match",
            setup=lambda root, case: signed(root, case),
        ),
        Case(
            "signatures",
            "trusted key missing",
            ["verify", "--bundle", "{root}/bundle", "--trust-key", "{case}/none.pub"],
            "not found",
            setup=lambda root, case: None,
        ),
        Case(
            "signatures",
            "trusted key not PEM",
            ["verify", "--bundle", "{bundle}", "--trust-key", "{case}/key.pub"],
            "not a PEM public key",
            setup=lambda root, case: (signed(root, case), _write("key.pub", "garbage")(root, case)),
        ),
        Case(
            "signatures",
            "trusted key is the private key",
            ["verify", "--bundle", "{bundle}", "--trust-key", "{root}/keys/signing.key"],
            "not a PEM public key",
            setup=lambda root, case: signed(root, case),
        ),
        Case("signatures", "keygen over existing keys", ["keygen", "--out", "{root}/keys"], "never replaced"),
        Case(
            "signatures",
            "keygen into a file",
            ["keygen", "--out", "{case}/file"],
            "cannot create",
            setup=_write("file", "x"),
        ),
        Case(
            "signatures",
            "sign with a missing key",
            ["sign", "--bundle", "{root}/bundle", "--key", "{case}/none.key"],
            "not found",
        ),
        Case(
            "signatures",
            "sign something that is not a bundle",
            ["sign", "--bundle", "{case}", "--key", "{root}/keys/signing.key"],
            "not a stepquant bundle",
        ),
        Case(
            "signatures",
            "verify something that is not a bundle",
            ["verify", "--bundle", "{case}"],
            "not a stepquant bundle",
        ),
    ]

    found += [
        Case("lint", "an empty file", ["lint", "{case}/g.onnx"], "not a quantized", setup=_write("g.onnx", b"")),
        Case(
            "lint", "a 2-byte file", ["lint", "{case}/g.onnx"], "not a quantized", setup=_write("g.onnx", b"\x08\x01")
        ),
        Case(
            "lint",
            "a text file",
            ["lint", "{case}/g.onnx"],
            "not a readable ONNX model",
            setup=_write("g.onnx", "hello"),
        ),
        Case("lint", "an FP graph without Q/DQ", ["lint", "{root}/bundle/model_fp32.onnx"], "not a quantized"),
        Case("lint", "a missing file", ["lint", "{case}/none.onnx"], "not found"),
        Case("other commands", "parity --rtol -1", ["parity", "--bundle", "{root}/bundle", "--rtol", "-1"], "'--rtol'"),
        Case(
            "other commands",
            "parity --backend tensorrt without TensorRT",
            ["parity", "--bundle", "{root}/bundle", "--backend", "tensorrt"],
            "TensorRT is not installed",
        ),
        Case("other commands", "eval --n 1", ["eval", "--bundle", "{root}/bundle", "--n", "1"], "'--n'"),
        Case("other commands", "eval --n 10**6", ["eval", "--bundle", "{root}/bundle", "--n", "1000000"], "'--n'"),
        Case("other commands", "bench --batch 0", ["bench", "--bundle", "{root}/bundle", "--batch", "0"], "--batch"),
        Case(
            "other commands",
            "bench --batch far above the bundle's range",
            ["bench", "--bundle", "{root}/bundle", "--batch", "1000000"],
            "outside the bundle's batch range",
        ),
        *[
            Case(
                "other commands",
                f"parity --rtol {rtol}",
                ["parity", "--bundle", "{root}/bundle", "--rtol", rtol],
                "must be a median relative error in [0, 1)",
            )
            for rtol in ("5", "1", "inf", "nan")
        ],
        Case(
            "other commands",
            "bench --threads 0",
            ["bench", "--bundle", "{root}/bundle", "--threads", "0"],
            "'--threads'",
        ),
        Case(
            "other commands",
            "inspect something that is not a bundle",
            ["inspect", "--bundle", "{case}"],
            "not a stepquant bundle",
        ),
        Case(
            "other commands",
            "build-engine without TensorRT",
            ["build-engine", "--bundle", "{root}/bundle"],
            "TensorRT is not installed",
        ),
        Case(
            "other commands",
            "build-engine --batch-range 0:1:1",
            ["build-engine", "--bundle", "{root}/bundle", "--batch-range", "0:1:1"],
            "1 <= min <= opt <= max",
        ),
        Case(
            "other commands",
            "encode-prompts for a missing model",
            [
                "encode-prompts",
                "--model",
                "{case}/nope",
                "--prompts-file",
                "{case}/p.txt",
                "--out",
                "{case}/c.safetensors",
            ],
            "nope",
        ),
        Case("other commands", "an unknown command", ["quantize"], "quantize"),
        Case("other commands", "an unknown option", ["sample", "--bundel", "{root}/bundle"], "--bundel"),
    ]
    return found


def prepare(root: Path) -> None:
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=DDPMScheduler(**SCHEDULER_CONFIG)).save_pretrained(
        root / "model"
    )
    code, _, err = invoke(
        "export-quantized",
        ["--out", root / "bundle", "--steps", "4", "--calib-samples", "4", "--eval-samples", "2", "--no-progress"],
    )
    if code:
        raise SystemExit(f"could not export the sandbox's bundle: {err}")
    save_tiny_text_pipeline(root / "pipe")
    (root / "prompts.txt").write_text("\n".join(TINY_PROMPTS) + "\n")
    code, _, err = invoke(
        "export-quantized",
        ["--model", root / "pipe", "--prompts-file", root / "prompts.txt", "--out", root / "t2i", *FAST],
    )
    if code:
        raise SystemExit(f"could not export the sandbox's text-to-image bundle: {err}")
    generate_keypair(root / "keys")
    generate_keypair(root / "other")
    (root / "secret.txt").write_text("not for a bundle to read")
    (root / "evil.onnx").write_bytes((root / "bundle" / "model.onnx").read_bytes())
    (root / "work").mkdir()
    (root / "work" / "notes.txt").write_text("valuable")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def run(case: Case, root: Path, index: int) -> tuple[bool, str]:
    directory = root / "cases" / f"{index:03d}"
    directory.mkdir(parents=True)
    if case.setup:
        case.setup(root, directory)
    args = [a.format(root=root, case=directory, bundle=directory / "bundle") for a in case.args]
    before = snapshot(root)
    OPENED.clear()
    RECORDING.set()
    made: dict[str, bytes] = {}
    beside = threading.Thread(target=lambda: made.update(case.during(directory))) if case.during else None
    cwd = os.getcwd()
    os.chdir(root / "work")
    try:
        if beside:
            beside.start()
        code, _, err = invoke(case.prog, args)
    except BaseException as escaped:  # an escape is a case not held
        code, err = -1, f"Traceback: {type(escaped).__name__}: {escaped}"
    finally:
        os.chdir(cwd)
        if beside:
            beside.join()
        RECORDING.clear()
    lines = [line for line in err.splitlines() if line.strip()]
    problems = []
    if code == 0:
        problems.append("exit 0")
    if len(lines) != 1 or "error:" not in lines[0] or "Traceback" in err:
        problems.append(f"{len(lines)} stderr lines")
    elif case.expect not in lines[0]:
        problems.append(f"message lacks {case.expect!r}")
    after = snapshot(root)
    prefix = directory.relative_to(root)
    kept = {
        str(prefix / name)
        for name, content in made.items()
        if (directory / name).is_file() and (directory / name).read_bytes() == content
    }
    if len(kept) < len(made):
        problems.append("lost what was made beside it")
    folders = {str(folder) for k in kept for folder in Path(k).parents if folder.is_relative_to(prefix)}  # their mtimes
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)} - kept - folders
    if changed:
        problems.append(f"changed {sorted(changed)[:3]}")
    opened = [p for p in OPENED for name in case.forbidden if p == str(root / name)]
    if opened:
        problems.append(f"opened {opened[:2]}")
    return not problems, (lines[-1] if lines else "(nothing)")[:140] + (f" [{'; '.join(problems)}]" if problems else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run one category")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    watch_opens()
    selected = [c for c in cases() if args.only in (None, c.category)]
    rows = ["| category | input | held | what the command said |", "|---|---|---|---|"]
    per_category: dict[str, list[int]] = {}
    held = 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        prepare(root)
        for index, case in enumerate(selected):
            ok, said = run(case, root, index)
            held += ok
            per_category.setdefault(case.category, [0, 0])[0] += ok
            per_category[case.category][1] += 1
            row = f"| {case.category} | {case.name} | {'held' if ok else '**not held**'} | `{said.replace('|', '/')}` |"
            print(row, flush=True)
            if not ok:
                rows.append(row)
    summary = f"{held} of {len(selected)} held ({time.perf_counter() - start:.0f} s)."
    print(summary)
    if not args.no_write:  # the page: cases per category, and every case not held in full (the run prints all)
        table = [
            "| category | cases | held |",
            "|---|---|---|",
            *(f"| {name} | {total} | {ok} |" for name, (ok, total) in per_category.items()),
        ]
        failed = ["", "Not held:", "", *rows] if len(rows) > 2 else []
        write_section(
            "robustness",
            header() + "\nEach case: exit non-zero, one line naming the problem, no traceback, "
            "nothing written or deleted in the sandbox, no file outside the bundle opened. "
            + summary
            + "\n\n"
            + "\n".join(table + failed)
            + "\n",
        )
    if held < len(selected):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
