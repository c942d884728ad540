#!/usr/bin/env bash
# Export the demo model at W8A8 and check the bundle it wrote.
set -euo pipefail
OUT=${OUT:-out/examples}
export-quantized --out "$OUT/demo-w8a8" --overwrite --no-progress ${FAST:-}
stepquant verify --bundle "$OUT/demo-w8a8"
stepquant inspect --bundle "$OUT/demo-w8a8" | head -n 5
