"""Reading a bundle that came from elsewhere, trusting nothing in it.

Every path the manifest names must be a plain relative path inside the bundle, every file a regular file
reached through no symbolic link and listed with its sha256, and the manifest must be one this stepquant
reads (`Manifest.from_dict`). Loading refuses anything else with one line, before any other file is read;
only JSON is read here (ONNX and safetensors by their own libraries, never pickle). With a trusted public
key, an unsigned bundle or one whose signature does not match is refused too. No heavy import: the export
writes with these names, the device runtime reads with them.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from stepquant.bundle.manifest import BundleError, Manifest, Target, check_format_version

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SELF_HASH = "manifest_sha256"
MAX_MANIFEST_BYTES = 64 * 2**20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
            raise BundleError(f"bundle {self.path} has no {name} graph (it holds {', '.join(targets)}); "
                              f"export it with --target {name}")
        return targets[name]

    def target_for(self, backend: str) -> str:
        """The target profile a runtime backend executes: TensorRT its own; onnxruntime the CPU profile
        when the bundle carries one (integer kernels), else the TensorRT graph (a correct, slower reference)."""
        if backend == "tensorrt" or "onnxruntime-cpu" not in self.manifest.targets:
            return "tensorrt"
        return "onnxruntime-cpu"


def confined_file(root: Path, name: object) -> Path:
    """`root / name` if `name` is a plain relative POSIX path to a regular file reached through no symbolic
    link; else BundleError naming the problem (nothing outside the bundle is opened or reported on)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise BundleError(f"bundle {root} lists an invalid file name {name!r}")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or any(part in ("..", ".") for part in parts) or name != "/".join(parts):
        raise BundleError(f"bundle {root} lists {name!r}, a path outside the bundle or not a plain relative path")
    path = root
    for part in parts:
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
        content = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "format_version" in content and isinstance(content.get("files"), dict)


def load_bundle(path: str | Path, trust_key: Path | None = None) -> Bundle:
    """Open a bundle, verifying its format version, its manifest's structure, that every file it lists is a
    regular file inside it with the listed sha256, and, given a trusted public key, its signature."""
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
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path} is not valid JSON: {err}") from err
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
    for name, expected in typed.files.items():
        if sha256_file(confined_file(path, name)) != expected:
            raise BundleError(f"bundle {path} was modified after export: sha256 of {name} does not match the manifest")
    return Bundle(path=path, manifest=typed, signed_by=trust_key)
