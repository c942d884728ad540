#!/usr/bin/env bash
# Calibrate on a few prompts, then generate from prompts the bundle never saw.
set -euo pipefail
OUT=${OUT:-out/examples}
mkdir -p "$OUT"
printf 'a red seven on a blue background\nthe digit 3 in green, yellow paper\n' > "$OUT/prompts.txt"
export-quantized --model demo-digits-sd --prompts-file "$OUT/prompts.txt" --guidance-scale 5 --out "$OUT/sd" --overwrite --no-progress ${FAST:-}
stepquant generate --bundle "$OUT/sd" --prompt "a white four on a black background" --n 2 --out "$OUT/fours.png" --no-progress
