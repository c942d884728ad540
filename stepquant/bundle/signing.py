"""Ed25519 signatures of bundle manifests (the `cryptography` library), so a fleet of devices can refuse a
bundle its owner did not sign. The manifest lists the sha256 of every file, so signing its bytes signs the
whole bundle; the signature travels beside it as `manifest.sig` (base64).

Keys are PEM files: `signing.key` (PKCS#8, readable by its owner only) and `signing.pub` (SubjectPublicKeyInfo).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

PRIVATE_KEY, PUBLIC_KEY = "signing.key", "signing.pub"


class SignatureError(ValueError):
    """A key cannot be read or written, or a bundle's signature is missing or does not verify."""


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Write a new key pair into `directory` (created if needed); never replaces an existing key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory = Path(directory)
    private, public = directory / PRIVATE_KEY, directory / PUBLIC_KEY
    existing = [p.name for p in (private, public) if p.exists() or p.is_symlink()]
    if existing:
        raise SignatureError(
            f"{directory} already holds {', '.join(existing)}: keys are never replaced; choose another --out"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SignatureError(f"cannot create {directory}: {err.strerror}") from err
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
        public.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    except OSError as err:
        raise SignatureError(f"cannot write the key pair into {directory}: {err.strerror}") from err
    return private, public


def _read(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise SignatureError(f"{what} {path} not found")
    try:
        return path.read_bytes()
    except OSError as err:
        raise SignatureError(f"cannot read {what} {path}: {err.strerror}") from err


def sign(data: bytes, private_key: Path) -> bytes:
    """The base64 Ed25519 signature of `data` with the PEM private key at `private_key`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = _read(private_key, "signing key")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as err:
        raise SignatureError(f"{private_key} is not an unencrypted PEM private key") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{private_key} is not an Ed25519 key (make one with `stepquant keygen`)")
    return base64.b64encode(key.sign(data)) + b"\n"


def public_key(path: Path):
    """The Ed25519 public key in the PEM file at `path`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    pem = _read(path, "trusted key")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as err:
        raise SignatureError(f"{path} is not a PEM public key") from err
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key (make one with `stepquant keygen`)")
    return key


def verify(data: bytes, signature: bytes, key_path: Path, what: str) -> None:
    """Raise unless `signature` (base64) is the Ed25519 signature of `data` by the PEM public key at `key_path`."""
    from cryptography.exceptions import InvalidSignature

    key = public_key(key_path)
    try:
        key.verify(base64.b64decode(signature.strip(), validate=True), data)
    except (InvalidSignature, ValueError) as err:
        raise SignatureError(
            f"{what}'s signature does not match the trusted key {key_path}: the bundle was changed "
            "after signing or signed by another key"
        ) from err
