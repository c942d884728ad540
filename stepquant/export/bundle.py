"""The bundle: a directory written atomically (staged beside its destination, then renamed) whose
manifest lists the sha256 of every file and a hash of itself. Loading refuses anything that does not
match, and reads only JSON here (ONNX and safetensors are read by their own libraries, never pickle)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stepquant.export.shapes import ShapeProfile
from stepquant.models.denoisers import ConditionInput

FORMAT_VERSION = 4  # 2: one section per target profile (manifest["targets"]); 3: condition inputs and shape ranges;
# 4: layer-wise parity (a target's "parity" holds "layerwise" reports and the "end_to_end" replay reference)
MANIFEST = "manifest.json"
_SELF_HASH = "manifest_sha256"


class BundleError(ValueError):
    """A bundle is missing, incomplete, of another format version, or was changed after export."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != _SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def staged_directory(destination: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory beside `destination`; on success it replaces `destination`,
    on any error it is removed, so a failed export never leaves a partial bundle."""
    destination = Path(destination).absolute()
    if destination.exists() and not overwrite:
        raise BundleError(f"{destination} already exists (pass --overwrite to replace it)")
    if destination.exists() and not destination.is_dir():
        raise BundleError(f"{destination} exists and is not a directory")
    parent = destination.parent
    if not parent.is_dir():
        raise BundleError(f"cannot write the bundle: {parent} is not an existing directory")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=parent))
    except OSError as err:
        raise BundleError(f"cannot write the bundle into {parent}: {err.strerror}") from err
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary directory
    try:
        yield staging
        if destination.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=parent))
            os.replace(destination, retired / destination.name)
            os.replace(staging, destination)
            shutil.rmtree(retired)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Add the format version, every file's sha256 and the self-hash, then write manifest.json."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format_version": FORMAT_VERSION, **manifest,
                "files": {p.relative_to(directory).as_posix(): _sha256(p) for p in files}}
    manifest[_SELF_HASH] = _manifest_hash(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


@dataclass
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict

    def file(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise BundleError(f"bundle {self.path} has no file {name}")
        return self.path / name

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["sample_shape"])  # type: ignore[return-value]

    @property
    def conditions(self) -> tuple[ConditionInput, ...]:
        """The graph's inputs after (sample, timestep): text embeddings and the like; none when unconditional."""
        return tuple(ConditionInput(c["name"], tuple(c["shape"])) for c in self.manifest["inputs"]["conditions"])

    @property
    def shape_profile(self) -> ShapeProfile:
        """The batch / height / width / sequence ranges the graphs accept."""
        return ShapeProfile.from_dict(self.manifest["inputs"]["shape_profile"])

    def target(self, name: str) -> dict:
        """The manifest section of one target profile: its `timestep_groups` ([{graph, timesteps,
        parity}]), parity report and quality."""
        targets = self.manifest["targets"]
        if name not in targets:
            raise BundleError(f"bundle {self.path} has no {name} graph (it holds {', '.join(targets)}); "
                              f"export it with --target {name}")
        return targets[name]

    def target_for(self, backend: str) -> str:
        """The target profile a runtime backend executes: TensorRT its own; onnxruntime the CPU profile
        when the bundle carries one (integer kernels), else the TensorRT graph (a correct, slower reference)."""
        if backend == "tensorrt" or "onnxruntime-cpu" not in self.manifest["targets"]:
            return "tensorrt"
        return "onnxruntime-cpu"


def load_bundle(path: str | Path) -> Bundle:
    """Open a bundle, verifying its format version, its manifest and the sha256 of every file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"bundle {path} not found (no such directory)")
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a stepquant bundle: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise BundleError(f"{path}: bundle format version {found!r} is not supported (this stepquant reads {FORMAT_VERSION})")
    if manifest.get(_SELF_HASH) != _manifest_hash(manifest):
        raise BundleError(f"{manifest_path} was modified after export (its self-hash does not match)")
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"bundle {path} is incomplete: {name} is missing")
        if _sha256(file) != expected:
            raise BundleError(f"bundle {path} was modified after export: sha256 of {name} does not match the manifest")
    return Bundle(path=path, manifest=manifest)


def extend_bundle(bundle: Bundle, add_files, manifest_update: dict) -> Bundle:
    """Atomically rewrite `bundle` with extra files (written by `add_files(staging_dir)`) and manifest
    entries; the manifest's hashes are recomputed. Used to add a TensorRT engine built later."""
    body = {k: v for k, v in bundle.manifest.items() if k not in ("format_version", "files", _SELF_HASH)}
    with staged_directory(bundle.path, overwrite=True) as staging:
        for item in bundle.path.iterdir():
            if item.name != MANIFEST:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        add_files(staging)
        write_manifest(staging, {**body, **manifest_update})
    return load_bundle(bundle.path)
