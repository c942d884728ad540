#!/usr/bin/env bash
# The checks to run on a lent GPU machine (see /work/.library/device/README.md): install the carried wheels
# (the image lacks diffusers, Polygraphy, onnxconverter-common, cryptography and typer 0.29), install stepquant
# editable, then run the CUDA tests (libcudart, --device cuda calibration) and the runtime's checks first, the rest of the suite after, each file
# under its own time limit, so a short lease still answers the questions that need that machine.
#   run: bash tools/device_check.sh [SECONDS_PER_FILE]    (carry: .whl; logs come back under $OUT)
# Measured 2026-11-30 on nvidia-h200 (gVisor): pytest-xdist workers took minutes to start there and the
# whole suite did not fit in 8 minutes, so files run one by one, without xdist.
set -o pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
LIMIT="${1:-120}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl 2>&1 | tail -3
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
{ nvidia-smi -L; python3 -c "import torch, onnxruntime, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"; } | tee "$OUT/machine.txt"
for file in tests/test_cuda.py tests/test_device.py tests/test_sampler.py tests/test_runtime_install.py $(ls tests/test_*.py | grep -v -e test_cuda -e test_device -e test_sampler -e test_runtime_install); do
  PYTHONUNBUFFERED=1 timeout "$LIMIT" python3 -m pytest -q -rs -p no:cacheprovider -p no:benchmark -p no:xdist "$file" 2>&1 \
    | tail -4 | sed "s|^|$file: |" | tee -a "$OUT/suite.log"
done
