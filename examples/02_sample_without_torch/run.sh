#!/usr/bin/env bash
# Sample a bundle with the runtime alone: the Python part fails if anything imports torch.
set -euo pipefail
OUT=${OUT:-out/examples}
export-quantized --out "$OUT/demo" --overwrite --no-progress ${FAST:-}
python - "$OUT/demo" <<'PY'
import sys

sys.modules["torch"] = None  # an import of torch would now fail: the runtime needs none
from stepquant.runtime import bundle_sampler, bundle_table, load_bundle, quantized_backend, sample

bundle = load_bundle(sys.argv[1])
images = sample(quantized_backend(bundle), bundle_table(bundle), range(8), bundle.manifest.sample_shape,
                bundle_sampler(bundle), progress=False).samples
print(f"8 samples {images.shape}, values in [{images.min():.2f}, {images.max():.2f}]")
PY
stepquant sample --bundle "$OUT/demo" --n 16 --out "$OUT/demo-samples.png" --no-progress
