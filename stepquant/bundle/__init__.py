"""The bundle format, with no heavy import: the typed manifest and the verified reader (export writes with
these names, the device runtime reads with them), and Ed25519 signatures."""

from stepquant.bundle.manifest import FORMAT_VERSION, BundleError, ConditionInput, Manifest, Target, TimestepGroup
from stepquant.bundle.reader import Bundle, load_bundle

__all__ = [
    "FORMAT_VERSION",
    "Bundle",
    "BundleError",
    "ConditionInput",
    "Manifest",
    "Target",
    "TimestepGroup",
    "load_bundle",
]
