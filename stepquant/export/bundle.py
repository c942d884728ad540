"""The bundle: a directory written atomically (staged beside its destination, then renamed) whose
manifest lists the sha256 of every file and a hash of itself, and may be signed (Ed25519, `manifest.sig`).

A bundle travels to other machines, so loading trusts nothing in it: every path the manifest names must be
a plain relative path inside the bundle, every file a regular file reached through no symbolic link and
listed with its sha256, and the manifest must hold what the commands read, with the types they read. Loading
refuses anything else with one line, before any other file is read; only JSON is read here (ONNX and
safetensors by their own libraries, never pickle). With a trusted public key, an unsigned bundle or one whose
signature does not match is refused too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from stepquant.export.shapes import ShapeProfile
from stepquant.models.denoisers import MAX_SAMPLE_ELEMENTS, ConditionInput

FORMAT_VERSION = 4  # 2: one section per target profile (manifest["targets"]); 3: condition inputs and shape ranges;
# 4: layer-wise parity (a target's "parity" holds "layerwise" reports and the "end_to_end" replay reference)
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
_SELF_HASH = "manifest_sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_MANIFEST_BYTES = 64 * 2**20


class BundleError(ValueError):
    """A bundle is missing, incomplete, of another format version, changed after export, or reaches outside
    itself; or a destination that is not a bundle would be replaced."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != _SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


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


def _check_replaceable(destination: Path, protected: tuple[Path, ...]) -> None:
    """Refuse to replace the current directory, a directory holding it or a protected path (the model
    being exported), or anything that is not a stepquant bundle."""
    here = Path.cwd().resolve()
    if destination == here or destination in here.parents:
        raise BundleError(f"refusing to replace {destination}: it is the current directory or holds it")
    for path in protected:
        if destination == path or destination in path.parents:
            raise BundleError(f"refusing to replace {destination}: it holds the model being exported ({path})")
    if not destination.is_dir():
        raise BundleError(f"{destination} exists and is not a directory: --overwrite replaces bundles only")
    if not is_bundle(destination):
        raise BundleError(f"refusing to replace {destination}: it is not a stepquant bundle (no {MANIFEST} saying so); "
                          "--overwrite replaces bundles only")


def check_destination(destination: Path, overwrite: bool = False, protected: tuple[Path, ...] = ()) -> Path:
    """The absolute `destination` a bundle may be written to: new, or with `overwrite` a stepquant bundle
    that is neither the current directory, nor holds it, nor is or holds a `protected` path (the model being
    exported). Callers check before any work; `staged_directory` checks again."""
    destination = Path(destination).expanduser().absolute()
    resolved = destination.resolve()
    protected = tuple(Path(p).expanduser().resolve() for p in protected)
    if destination.is_symlink():
        raise BundleError(f"{destination} is a symbolic link: --out must name a directory to create or a bundle to replace")
    if destination.exists():
        if not overwrite:
            raise BundleError(f"{destination} already exists (pass --overwrite to replace it)")
        _check_replaceable(resolved, protected)
    elif any(resolved in p.parents for p in protected):
        raise BundleError(f"refusing to write the bundle to {destination}: it would hold the model being exported")
    if not destination.parent.is_dir():
        raise BundleError(f"cannot write the bundle: {destination.parent} is not an existing directory")
    return destination


@contextlib.contextmanager
def staged_directory(destination: Path, overwrite: bool = False, protected: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield an empty staging directory beside `destination`; on success it replaces `destination`,
    on any error or interruption it is removed, so a failed export never leaves a partial bundle.

    With `overwrite`, an existing `destination` is replaced only if `check_destination` allows it."""
    destination = check_destination(destination, overwrite, protected)
    parent = destination.parent
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
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, SIGNATURE))
    manifest = {"format_version": FORMAT_VERSION, **manifest,
                "files": {p.relative_to(directory).as_posix(): _sha256(p) for p in files}}
    manifest[_SELF_HASH] = _manifest_hash(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def sign_manifest(directory: Path, private_key: Path) -> None:
    """Write `manifest.sig`, the Ed25519 signature of the directory's manifest.json (whole or not at all)."""
    from stepquant.export.signing import sign

    signature = sign((Path(directory) / MANIFEST).read_bytes(), private_key)
    handle, temporary = tempfile.mkstemp(prefix=f".{SIGNATURE}.", dir=directory)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(signature)
        os.chmod(temporary, 0o644)
        os.replace(temporary, Path(directory) / SIGNATURE)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@dataclass
class Bundle:
    """A verified bundle on disk: every file its manifest lists is inside it, regular and unchanged."""

    path: Path
    manifest: dict
    signed_by: Path | None = None  # the trusted public key its signature was verified with

    def file(self, name: str) -> Path:
        """The path of a file the manifest lists (checked at load); anything else is refused."""
        if name not in self.manifest["files"]:
            raise BundleError(f"bundle {self.path} lists no file {name!r}")
        return self.path / name

    def graphs(self) -> list[str]:
        """Every graph of every target (one per timestep group)."""
        return [group["graph"] for section in self.manifest["targets"].values() for group in section["timestep_groups"]]

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


def _confined_file(root: Path, name: object) -> Path:
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


def _require(condition: bool, manifest_path: Path, what: str) -> None:
    if not condition:
        raise BundleError(f"{manifest_path} is not a valid stepquant manifest: {what}")


def _check_structure(manifest: dict, manifest_path: Path) -> None:
    """What the commands read from a manifest is there, of the type they read, and every file it names is
    one it lists: a manifest from elsewhere fails here in one line, not in a traceback later."""
    def need(condition: bool, what: str) -> None:
        _require(condition, manifest_path, what)

    files = manifest.get("files")
    need(isinstance(files, dict) and all(isinstance(v, str) and _SHA256.fullmatch(v) for v in files.values()),
         "'files' must map file names to sha256 digests")
    listed = set(files)
    shape = manifest.get("sample_shape")
    need(isinstance(shape, list) and len(shape) == 3 and all(type(d) is int and d >= 1 for d in shape),
         "'sample_shape' must be three positive integers")
    need(shape[0] * shape[1] * shape[2] <= MAX_SAMPLE_ELEMENTS,
         f"'sample_shape' {shape} is over {MAX_SAMPLE_ELEMENTS:,} values per sample")
    inputs = manifest.get("inputs")
    need(isinstance(inputs, dict) and isinstance(inputs.get("conditions"), list)
         and isinstance(inputs.get("shape_profile"), dict), "'inputs' must hold 'conditions' and 'shape_profile'")
    need(all(isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("shape"), list)
             for c in inputs["conditions"]), "each of 'inputs.conditions' needs a name and a shape")
    need(isinstance(manifest.get("noise_schedule"), dict), "'noise_schedule' must be a scheduler config")
    sampler = manifest.get("sampler")
    need(isinstance(sampler, dict) and type(sampler.get("steps")) is int and sampler["steps"] >= 1
         and isinstance(sampler.get("guidance_scale"), (int, float)), "'sampler' must hold 'steps' and 'guidance_scale'")
    need(manifest.get("reference_graph") in listed, "'reference_graph' must be a listed file")
    correction = manifest.get("correction")
    need(isinstance(correction, dict) and (correction.get("file") is None or correction["file"] in listed),
         "'correction.file' must be null or a listed file")
    need(isinstance(manifest.get("engine", {}), dict), "'engine' must be an object")
    targets = manifest.get("targets")
    need(isinstance(targets, dict) and targets, "'targets' must name at least one target")
    for name, section in targets.items():
        need(isinstance(section, dict) and isinstance(section.get("timestep_groups"), list) and section["timestep_groups"],
             f"target {name!r} needs its 'timestep_groups'")
        for group in section["timestep_groups"]:
            need(isinstance(group, dict) and group.get("graph") in listed, f"target {name!r}: every graph must be a listed file")
            need(isinstance(group.get("parity"), str) and {f"{group['parity']}/inputs.json",
                                                           f"{group['parity']}/reference_outputs.json"} <= listed,
                 f"target {name!r}: every group's parity data must be listed files")
            need(group.get("timesteps") == "all" or (isinstance(group.get("timesteps"), list)
                                                     and all(isinstance(t, (int, float)) for t in group["timesteps"])),
                 f"target {name!r}: a group's 'timesteps' must be 'all' or numbers")
        parity = section.get("parity")
        need(isinstance(parity, dict) and isinstance(parity.get("end_to_end"), dict)
             and isinstance(parity["end_to_end"].get("tolerance_median_rel"), (int, float)),
             f"target {name!r} needs its parity's end-to-end tolerance")
        need(section.get("onnxruntime_optimization_level") in ("disable", "basic", "extended", "all")
             and section.get("parity_optimization_level") in ("disable", "basic", "extended", "all"),
             f"target {name!r} needs onnxruntime optimisation levels")


def load_bundle(path: str | Path, trust_key: Path | None = None) -> Bundle:
    """Open a bundle, verifying its format version, its manifest's structure, that every file it lists is a
    regular file inside it with the listed sha256, and, given a trusted public key, its signature."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle {path} not found (no such directory)")
    manifest_path = path / MANIFEST
    if not manifest_path.exists() and not manifest_path.is_symlink():
        raise BundleError(f"{path} is not a stepquant bundle: no {MANIFEST}")
    _confined_file(path, MANIFEST)
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path} is over {MAX_MANIFEST_BYTES // 2**20} MiB: not a stepquant manifest")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise BundleError(f"{path}: bundle format version {found!r} is not supported (this stepquant reads {FORMAT_VERSION})")
    if manifest.get(_SELF_HASH) != _manifest_hash(manifest):
        raise BundleError(f"{manifest_path} was modified after export (its self-hash does not match)")
    if trust_key is not None:
        from stepquant.export.signing import public_key, verify

        public_key(trust_key)  # a key that cannot be read is the first thing to say
        signature = path / SIGNATURE
        if not signature.exists() and not signature.is_symlink():
            raise BundleError(f"bundle {path} is not signed (no {SIGNATURE}), and a trusted key was given")
        verify(raw, _confined_file(path, SIGNATURE).read_bytes(), trust_key, f"bundle {path}")
    _check_structure(manifest, manifest_path)
    for name, expected in manifest["files"].items():
        if _sha256(_confined_file(path, name)) != expected:
            raise BundleError(f"bundle {path} was modified after export: sha256 of {name} does not match the manifest")
    return Bundle(path=path, manifest=manifest, signed_by=trust_key)


def extend_bundle(bundle: Bundle, add_files, manifest_update: dict, sign_key: Path | None = None) -> Bundle:
    """Atomically rewrite `bundle` with the files it lists, extra files (written by `add_files(staging_dir)`)
    and manifest entries; the manifest's hashes are recomputed, and it is signed again with `sign_key` (a
    signature of the old manifest would no longer match). Used to add a TensorRT engine built later."""
    body = {k: v for k, v in bundle.manifest.items() if k not in ("format_version", "files", _SELF_HASH)}
    with staged_directory(bundle.path, overwrite=True) as staging:
        for name in bundle.manifest["files"]:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle.file(name), staging / name)
        add_files(staging)
        write_manifest(staging, {**body, **manifest_update})
        if sign_key is not None:
            sign_manifest(staging, sign_key)
    return load_bundle(bundle.path)
