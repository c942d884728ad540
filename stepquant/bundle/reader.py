"""Reading a bundle that came from elsewhere, trusting nothing in it.

Every path the manifest names must be a plain relative path inside the bundle, every file a regular file
reached through no symbolic link and listed with its sha256, and the manifest must be one this stepquant
reads (`Manifest.from_dict`). Every graph's external-data references must be listed files too, its
declared inputs must be the ones the manifest describes, and its quantization scales finite and positive
(read from the graph's own bytes by `graph_facts`, so before onnxruntime opens it). Loading refuses anything
else with one line; only JSON and protobuf fields are read here (ONNX and safetensors by their own libraries,
never pickle). With a trusted public key, an unsigned bundle or one whose signature does not match is refused
too. `strict` (what `verify` asks) also refuses files the manifest does not list. No heavy import: the export
writes with these names, the device runtime reads with them.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from stepquant.bundle.graph_facts import GraphFacts, GraphFormatError, read_graph_facts
from stepquant.bundle.manifest import SEQUENCE, BundleError, Manifest, Target, check_format_version
from stepquant.bundle.targets import preferred_target

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SELF_HASH = "manifest_sha256"
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 64  # a stepquant manifest nests under 10 deep; Python's parser recurses per level
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKETS = re.compile(rb"[\[\]{}]")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bounded_json(raw: bytes, where: str, max_bytes: int = MAX_MANIFEST_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON from elsewhere once its size and nesting depth are known to be bounded (counted over the
    text outside strings, before the recursive parser sees it)."""
    if len(raw) > max_bytes:
        raise BundleError(f"{where} is over {max_bytes // 2**20} MiB: not a stepquant file")
    brackets = _JSON_BRACKETS.findall(_JSON_STRING.sub(b'""', raw))
    if brackets:
        steps = np.frombuffer(b"".join(brackets), dtype=np.uint8)
        depth = np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1)).max()
        if depth > max_depth:
            raise BundleError(f"{where} nests values {depth} deep (at most {max_depth}): not a stepquant file")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{where} is not valid JSON: {err}") from err


def manifest_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class Bundle:
    """A verified bundle on disk: every file its manifest lists is inside it, regular and unchanged."""

    path: Path
    manifest: Manifest
    signed_by: Path | None = None  # the trusted public key its signature was verified with

    def file(self, name: str) -> Path:
        """The path of a file the manifest lists (checked at load); anything else is refused."""
        if name not in self.manifest.files:
            raise BundleError(f"bundle {self.path} lists no file {name!r}")
        return self.path / name

    def graphs(self) -> list[str]:
        """Every graph of every target (one per timestep group)."""
        return [graph for target in self.manifest.targets.values() for graph in target.graphs]

    def target(self, name: str) -> Target:
        """One target profile's section: its timestep groups (graph, timesteps, parity data) and parity report."""
        targets = self.manifest.targets
        if name not in targets:
            raise BundleError(
                f"bundle {self.path} has no {name} graph (it holds {', '.join(targets)}); "
                f"export it with --target {name}"
            )
        return targets[name]

    def target_for(self, backend: str, provider: str = "cpu") -> str:
        """The target profile a runtime backend executes (bundle/targets.py): TensorRT its own; onnxruntime on
        the CPU the CPU profile when the bundle carries one (integer kernels), else the TensorRT graph."""
        return preferred_target(self.manifest.targets, backend, provider)


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and "\\" not in name and "\0" not in name


def _plain_relative(name: str) -> bool:
    """Whether `name` is a relative POSIX path with no '.', '..', empty or trailing part: one that stays inside."""
    parts = PurePosixPath(name).parts
    return (
        not PurePosixPath(name).is_absolute()
        and not any(part in ("..", ".") for part in parts)
        and name == "/".join(parts)
    )


def confined_file(root: Path, name: object) -> Path:
    """`root / name` if `name` is a plain relative POSIX path to a regular file reached through no symbolic
    link; else BundleError naming the problem (nothing outside the bundle is opened or reported on)."""
    if not _valid_name(name):
        raise BundleError(f"bundle {root} lists an invalid file name {name!r}")
    if not _plain_relative(name):
        raise BundleError(f"bundle {root} lists {name!r}, a path outside the bundle or not a plain relative path")
    path = root
    for part in PurePosixPath(name).parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise BundleError(f"bundle {root} is incomplete: {name} is missing") from None
        except OSError as err:
            raise BundleError(f"bundle {root}: cannot read {name}: {err.strerror}") from err
        if stat.S_ISLNK(mode):
            raise BundleError(f"bundle {root}: {name} is reached through a symbolic link, which a bundle may not hold")
    if not stat.S_ISREG(mode):
        raise BundleError(f"bundle {root}: {name} is not a regular file")
    return path


def is_bundle(directory: Path) -> bool:
    """Whether `directory` holds a stepquant manifest (a regular file with a format version and a file list)."""
    manifest = Path(directory) / MANIFEST
    try:
        if not stat.S_ISREG(os.lstat(manifest).st_mode) or manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        content = bounded_json(manifest.read_bytes(), str(manifest))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "format_version" in content and isinstance(content.get("files"), dict)


def _check_inputs(root: Path, name: str, declared: dict[str, tuple], manifest: Manifest) -> None:
    """The graph's declared inputs are the sample, the timestep and the manifest's condition inputs, with the
    manifest's fixed sizes wherever the graph fixes them too (a forged shape fails here, not in an engine)."""
    expected = {
        "sample": (None, *manifest.sample_shape),
        "timestep": None,
        **{c.name: (None, *(None if d == SEQUENCE else d for d in c.shape)) for c in manifest.conditions},
    }
    if set(declared) != set(expected):
        raise BundleError(
            f"bundle {root}: {name} takes inputs {sorted(declared)}, the manifest describes {sorted(expected)}"
        )
    for input_name, want in expected.items():
        dims = declared[input_name]
        if want is None:
            continue
        if len(dims) != len(want) or any(
            isinstance(g, int) and isinstance(w, int) and g != w for g, w in zip(dims, want)
        ):
            shown = ["?" if d is None else d for d in want]
            raise BundleError(
                f"bundle {root}: {name} declares input {input_name} of shape {list(dims)}, the manifest "
                f"says {shown} (batch first)"
            )


def _check_graph(root: Path, name: str, manifest: Manifest, runs: bool) -> GraphFacts:
    """A listed graph: every external-data file it names is a listed file, and a graph the runtime `runs`
    (the targets' and the reference) has the manifest's inputs and finite, positive scales."""
    try:
        facts = read_graph_facts(root / name)
    except GraphFormatError as err:
        raise BundleError(f"bundle {root}: {name} is not an ONNX graph ({err})") from None
    for location in sorted(facts.external_data):
        target = posixpath.join(posixpath.dirname(name), location).removeprefix("./")  # as onnxruntime resolves it
        if not _valid_name(location) or not _plain_relative(target):
            raise BundleError(
                f"bundle {root}: {name} reads tensors from {location!r}, outside the bundle or not a plain "
                "file name beside it"
            )
        if target not in manifest.files:
            raise BundleError(f"bundle {root}: {name} reads tensors from {target}, which the manifest does not list")
    if runs:
        _check_inputs(root, name, facts.inputs, manifest)
        for tensor, values in sorted(facts.scales.items()):
            if values is not None and not (np.isfinite(values).all() and (values > 0).all()):
                raise BundleError(
                    f"bundle {root}: {name} has a quantization scale {tensor} that is not finite and "
                    "positive (the graph was edited or its calibration failed)"
                )
    return facts


def _check_tree(root: Path, listed: set[str], strict: bool) -> None:
    """No symbolic link anywhere in the bundle; with `strict`, no file its manifest does not list."""
    for directory, folders, names in os.walk(root):
        for entry in [*folders, *names]:
            path = Path(directory) / entry
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                raise BundleError(f"bundle {root} holds a symbolic link, {relative}, which a bundle may not hold")
            if strict and entry in names and relative not in listed and relative not in (MANIFEST, SIGNATURE):
                raise BundleError(f"bundle {root} holds {relative}, which its manifest does not list")


def load_bundle(path: str | Path, trust_key: Path | None = None, strict: bool = False) -> Bundle:
    """Open a bundle, verifying its format version, its manifest's structure, that every file it lists is a
    regular file inside it with the listed sha256, that its graphs read only listed files and agree with the
    manifest, and, given a trusted public key, its signature. `strict`: refuse unlisted files too."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle {path} not found (no such directory)")
    manifest_path = path / MANIFEST
    if not manifest_path.exists() and not manifest_path.is_symlink():
        raise BundleError(f"{path} is not a stepquant bundle: no {MANIFEST}")
    confined_file(path, MANIFEST)
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path} is over {MAX_MANIFEST_BYTES // 2**20} MiB: not a stepquant manifest")
    raw = manifest_path.read_bytes()
    data = bounded_json(raw, str(manifest_path))
    check_format_version(data, str(path))
    if data.get(SELF_HASH) != manifest_hash(data):
        raise BundleError(f"{manifest_path} was modified after export (its self-hash does not match)")
    if trust_key is not None:
        from stepquant.bundle.signing import public_key, verify

        public_key(trust_key)  # a key that cannot be read is the first thing to say
        signature = path / SIGNATURE
        if not signature.exists() and not signature.is_symlink():
            raise BundleError(f"bundle {path} is not signed (no {SIGNATURE}), and a trusted key was given")
        verify(raw, confined_file(path, SIGNATURE).read_bytes(), trust_key, f"bundle {path}")
    typed = Manifest.from_dict(data, str(manifest_path))
    _check_tree(path, set(typed.files), strict)
    for name, expected in typed.files.items():
        if sha256_file(confined_file(path, name)) != expected:
            raise BundleError(f"bundle {path} was modified after export: sha256 of {name} does not match the manifest")
    bundle = Bundle(path=path, manifest=typed, signed_by=trust_key)
    runs = {*bundle.graphs(), typed.reference_graph}
    facts = {
        name: _check_graph(path, name, typed, name in runs)
        for name in sorted(n for n in typed.files if n.endswith(".onnx"))
    }
    if typed.text_to_image is not None:
        _check_parts(path, typed, facts)
    return bundle


def _check_parts(root: Path, manifest: Manifest, facts: dict[str, GraphFacts]) -> None:
    """A text-to-image bundle's text encoders take token ids, and its VAE decoder the denoiser's latents."""
    parts = manifest.text_to_image
    for encoder in parts.encoders:
        text, expected = list(facts[encoder.graph].inputs), ["input_ids"]
        if encoder.attention_mask:
            expected.append("attention_mask")
        if text != expected:
            raise BundleError(
                f"bundle {root}: the text encoder {encoder.graph} takes {text}, not {' and '.join(expected)}"
            )
    vae = facts[parts.vae_decoder].inputs
    dims = vae.get("latent_sample", ())
    if (
        list(vae) != ["latent_sample"]
        or len(dims) != 4
        or (isinstance(dims[1], int) and dims[1] != manifest.sample_shape[0])
    ):
        raise BundleError(
            f"bundle {root}: the VAE decoder {parts.vae_decoder} takes {dict(vae)}, not the denoiser's "
            f"{manifest.sample_shape[0]}-channel latents"
        )
