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
from stepquant.bundle.reader import (
    MANIFEST,
    SELF_HASH,
    SIGNATURE,
    Bundle,
    is_bundle,
    load_bundle,
    manifest_hash,
    sha256_file,
)
from stepquant.file_modes import ordinary_modes, with_umask


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
        raise BundleError(
            f"refusing to replace {destination}: it is not a stepquant bundle (no {MANIFEST} saying so); "
            "--overwrite replaces bundles only"
        )


def check_destination(destination: Path, overwrite: bool = False, protected: tuple[Path, ...] = ()) -> Path:
    """The absolute `destination` a bundle may be written to: new, or with `overwrite` a stepquant bundle
    that is neither the current directory, nor holds it, nor is or holds a `protected` path (the model being
    exported). Callers check before any work; `staged_directory` checks again."""
    destination = Path(destination).expanduser().absolute()
    resolved = destination.resolve()
    protected = tuple(Path(p).expanduser().resolve() for p in protected)
    if destination.is_symlink():
        raise BundleError(
            f"{destination} is a symbolic link: --out must name a directory to create or a bundle to replace"
        )
    if destination.exists():
        if not overwrite:
            raise BundleError(f"{destination} already exists (pass --overwrite to replace it)")
        _check_replaceable(resolved, protected)
    elif any(resolved in p.parents for p in protected):
        raise BundleError(f"refusing to write the bundle to {destination}: it would hold the model being exported")
    if not destination.parent.is_dir():
        raise BundleError(f"cannot write the bundle: {destination.parent} is not an existing directory")
    return destination


def _identity(destination: Path) -> tuple[int, int, str] | None:
    """What is at `destination` now: nothing (None), or its device, inode and manifest digest."""
    try:
        status = os.lstat(destination)
    except FileNotFoundError:
        return None
    manifest = destination / MANIFEST
    digest = sha256_file(manifest) if manifest.is_file() and not manifest.is_symlink() else ""
    return status.st_dev, status.st_ino, digest


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on `directory` itself (no lock file to leave behind), so two stepquant processes
    never run their final renames into it at once. Where the platform has no flock, the rename alone guards."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def _rename_no_replace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, failing with FileExistsError if `target` exists: atomically where the
    system offers it (Linux renameat2, macOS renamex_np), else checked under `_directory_lock`, where the
    rename itself still refuses a non-empty directory."""
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, "renameat2", None)
    args = (-100, os.fsencode(source), -100, os.fsencode(target), 1) if call else None  # AT_FDCWD, RENAME_NOREPLACE
    if call is None and hasattr(libc, "renamex_np"):
        call, args = libc.renamex_np, (os.fsencode(source), os.fsencode(target), 4)  # RENAME_EXCL
    if call is not None:
        if call(*args) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise (
                FileExistsError(code, os.strerror(code), str(target))
                if code in (errno.EEXIST, errno.ENOTEMPTY)
                else OSError(code, os.strerror(code), str(target))
            )
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def _staging_name(destination: Path, suffix: str) -> dict[str, str]:
    """mkdtemp's arguments for a hidden directory beside `destination`, short enough for any legal name."""
    return {"prefix": f".{destination.name[:64]}.", "suffix": suffix, "dir": str(destination.parent)}


@contextlib.contextmanager
def staged_directory(destination: Path, overwrite: bool = False, protected: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield an empty staging directory beside `destination`; on success it takes `destination`'s place,
    on any error or interruption it is removed, so a failed export never leaves a partial bundle.

    The final step replaces only what was checked at the start: nothing, or (with `overwrite`) the same
    stepquant bundle. Whatever appeared or changed at `destination` meanwhile (another export, a user's
    folder) is left as it is, and this bundle is discarded with one line saying so."""
    destination = check_destination(destination, overwrite, protected)
    checked = _identity(destination)
    parent = destination.parent
    try:
        staging = Path(tempfile.mkdtemp(**_staging_name(destination, ".partial")))
    except OSError as err:
        raise BundleError(f"cannot write the bundle into {parent}: {err.strerror}") from err
    with_umask(staging, 0o777)  # mkdtemp makes it private; a bundle is an ordinary directory
    try:
        yield staging
        with _directory_lock(parent):
            if _identity(destination) != checked:
                raise BundleError(
                    f"{destination} {'appeared' if checked is None else 'changed'} while this export ran "
                    "(another export or program wrote it): it was left as it is and this bundle discarded"
                )
            _take_place(staging, destination, replace=checked is not None)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _take_place(staging: Path, destination: Path, replace: bool) -> None:
    """Rename `staging` to `destination`, retiring the bundle there first when `replace`; the retired bundle
    is deleted only once the new one is in place."""
    retired = Path(tempfile.mkdtemp(**_staging_name(destination, ".old"))) if replace else None
    if retired is not None:
        os.replace(destination, retired / "bundle")
    try:
        _rename_no_replace(staging, destination)
    except FileExistsError:
        kept = ""
        if retired is not None:
            try:
                _rename_no_replace(retired / "bundle", destination)
                retired.rmdir()
            except OSError:
                kept = f"; the bundle it held is kept at {retired / 'bundle'}"
        raise BundleError(
            f"{destination} appeared while this export ran (another export or program wrote it): "
            f"it was left as it is and this bundle discarded{kept}"
        ) from None
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def write_manifest(directory: Path, manifest: Manifest) -> dict:
    """Give every file an ordinary mode, add the format version, every file's sha256 and the self-hash, then
    write manifest.json."""
    ordinary_modes(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, SIGNATURE))
    body = {
        "format_version": FORMAT_VERSION,
        **manifest.to_dict(),
        "files": {p.relative_to(directory).as_posix(): sha256_file(p) for p in files},
    }
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


def extend_bundle(
    bundle: Bundle, add_files: Callable[[Path], None], manifest: Manifest, sign_key: Path | None = None
) -> Bundle:
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
