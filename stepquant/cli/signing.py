"""`stepquant keygen`, `stepquant sign`, `stepquant verify`: Ed25519 signatures of bundle manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stepquant.bundle import load_bundle
from stepquant.bundle.reader import SIGNATURE
from stepquant.bundle.signing import generate_keypair
from stepquant.cli.options import TrustKey
from stepquant.export.bundle import sign_manifest


def keygen_command(
    out: Annotated[Path, typer.Option(help="Directory for signing.key (private) and signing.pub.")],
) -> None:
    """Make an Ed25519 key pair for signing bundles; an existing key is never replaced."""
    private, public = generate_keypair(out)
    print(f"wrote {private} (private: keep it on the machine that exports) and {public} (give it to the devices)")


def sign_command(
    bundle: Annotated[Path, typer.Option(help="Bundle whose manifest to sign.")],
    key: Annotated[Path, typer.Option(help="Ed25519 private key (signing.key from `stepquant keygen`).")],
) -> None:
    """Sign a bundle after verifying it: the signature covers its manifest, which lists every file's sha256."""
    loaded = load_bundle(bundle)
    sign_manifest(loaded.path, key)
    print(f"signed {bundle} ({SIGNATURE})")


def verify_command(bundle: Annotated[Path, typer.Option(help="Bundle to verify.")], trust_key: TrustKey = None) -> None:
    """Verify a bundle: format, manifest, every file's sha256, confinement (no unlisted file, no symbolic link,
    no graph reading an unlisted file), and, with --trust-key, its signature."""
    loaded = load_bundle(bundle, trust_key, strict=True)
    signed = (
        f"signed by the key {trust_key}"
        if trust_key
        else (
            f"carries {SIGNATURE} (pass --trust-key to check it)" if (loaded.path / SIGNATURE).exists() else "unsigned"
        )
    )
    print(f"{bundle}: {len(loaded.manifest.files)} files verified; {signed}")
