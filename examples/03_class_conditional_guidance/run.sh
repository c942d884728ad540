#!/usr/bin/env bash
# Calibrate with guidance 3 on every class, then sample chosen digits from the bundle (it carries its class table).
set -euo pipefail
OUT=${OUT:-out/examples}
export-quantized --model demo-digits-cond --guidance-scale 3 --out "$OUT/cond" --overwrite --no-progress ${FAST:-}
stepquant sample --bundle "$OUT/cond" --classes 0,7 --n 4 --out "$OUT/cond-0-7.png" --no-progress
