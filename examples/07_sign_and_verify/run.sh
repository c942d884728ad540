#!/usr/bin/env bash
# Keys, a signed export, a verified bundle, and a tampered copy refused.
set -euo pipefail
OUT=${OUT:-out/examples}
mkdir -p "$OUT"
rm -rf "$OUT/keys" "$OUT/signed-tampered"
stepquant keygen --out "$OUT/keys"
export-quantized --out "$OUT/signed" --sign-key "$OUT/keys/signing.key" --overwrite --no-progress ${FAST:-}
stepquant verify --bundle "$OUT/signed" --trust-key "$OUT/keys/signing.pub"
cp -r "$OUT/signed" "$OUT/signed-tampered"
printf ' ' >> "$OUT/signed-tampered/build_engine.sh"
if stepquant verify --bundle "$OUT/signed-tampered" --trust-key "$OUT/keys/signing.pub"; then
    echo "a tampered bundle was accepted" >&2; exit 1
fi
echo "the tampered copy was refused"
