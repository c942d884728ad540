#!/usr/bin/env bash
# One bundle, several samplers: two stored at export, a third added later without recalibrating, each with its
# own table, correction terms and PSNR to FP; sampling picks one by its spec, and one not stored is refused.
set -euo pipefail
OUT=${OUT:-out/examples}
STEPS=25
if [ -n "${FAST:-}" ]; then STEPS=4; fi  # FAST shortens the export to seconds
SMALL=${FAST:+--calib-samples 4 --eval-samples 4}
export-quantized --out "$OUT/samplers" --overwrite --no-progress --correction ptqd $SMALL \
  --sampler "ddim:$STEPS" --sampler "dpm-solver++:$STEPS"
stepquant add-sampler --bundle "$OUT/samplers" --sampler "euler:$STEPS" --no-progress
stepquant inspect --bundle "$OUT/samplers" --sampler "euler:$STEPS" --plot "$OUT/euler-terms.png"
for spec in "ddim:$STEPS" "dpm-solver++:$STEPS" "euler:$STEPS"; do
  stepquant sample --bundle "$OUT/samplers" --sampler "$spec" --n 16 --out "$OUT/samples-${spec%%:*}.png" --no-progress
done
if stepquant sample --bundle "$OUT/samplers" --sampler unipc:10 --n 1 --out "$OUT/unipc.png" --no-progress; then
  echo "a sampler the bundle does not store was run" >&2
  exit 1
fi
echo "unipc:10 refused, as it should be: the bundle does not store it"
