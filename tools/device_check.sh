#!/usr/bin/env bash
# The checks to run on a lent GPU machine (see /work/.library/device/README.md): install the carried wheels
# (the image lacks diffusers, Polygraphy, onnxconverter-common, cryptography and typer 0.29), install stepquant
# editable, then run the whole suite (CUDA tests included) with the image's torch and onnxruntime.
#   run: bash tools/device_check.sh    (carry: .whl; the log comes back as $OUT/suite.log)
set -o pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl 2>&1 | tail -3
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
{ nvidia-smi -L; python3 -c "import torch, onnxruntime, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"; lscpu | grep -m1 'Model name'; } | tee "$OUT/machine.txt"
PYTHONUNBUFFERED=1 timeout 480 python3 -m pytest -q -rs -p no:cacheprovider -n 8 tests 2>&1 | tee "$OUT/suite.log" | tail -25
