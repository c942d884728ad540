"""Writing a bundle: a directory written atomically (staged beside its destination, then renamed) whose
manifest lists the sha256 of every file and a hash of itself, and may be signed (Ed25519, `manifest.sig`).
Reading it, on any machine, is stepquant.bundle's job."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from stepquant.bundle.manifest import FORMAT_VERSION, BundleError, Manifest
from stepquant.bundle.reader import MANIFEST, SELF_HASH, SIGNATURE, Bundle, is_bundle, load_bundle, manifest_hash, sha256_file


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


def with_umask(path: Path, mode: int) -> None:
    """Give `path` the permissions `mode` gets under the process's umask (what an ordinary open or mkdir
    would have given it), for files that libraries create private."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)


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
    with_umask(staging, 0o777)  # mkdtemp makes it private; a bundle is an ordinary directory
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


def write_manifest(directory: Path, manifest: Manifest) -> dict:
    """Add the format version, every file's sha256 and the self-hash, then write manifest.json."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, SIGNATURE))
    body = {"format_version": FORMAT_VERSION, **manifest.to_dict(),
            "files": {p.relative_to(directory).as_posix(): sha256_file(p) for p in files}}
    body[SELF_HASH] = manifest_hash(body)
    (directory / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")
    return body


def sign_manifest(directory: Path, private_key: Path) -> None:
    """Write `manifest.sig`, the Ed25519 signature of the directory's manifest.json (whole or not at all)."""
    from stepquant.bundle.signing import sign

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


def extend_bundle(bundle: Bundle, add_files: Callable[[Path], None], manifest: Manifest,
                  sign_key: Path | None = None) -> Bundle:
    """Atomically rewrite `bundle` with the files it lists, extra files (written by `add_files(staging_dir)`)
    and an updated `manifest`; its hashes are recomputed, and it is signed again with `sign_key` (a signature
    of the old manifest would no longer match). Used to add a TensorRT engine built later."""
    with staged_directory(bundle.path, overwrite=True) as staging:
        for name in bundle.manifest.files:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle.file(name), staging / name)
        add_files(staging)
        write_manifest(staging, manifest)
        if sign_key is not None:
            sign_manifest(staging, sign_key)
    return load_bundle(bundle.path)
