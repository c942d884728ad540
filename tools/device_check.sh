#!/usr/bin/env bash
# The checks to run on a lent GPU machine (see /work/.library/device/README.md), sized for one call of about
# 9 minutes, since a lease is 15 minutes with the machine's start:
#   1. install the carried wheels (the image lacks diffusers, Polygraphy, onnxconverter-common, cryptography and
#      typer 0.29) and stepquant, editable;
#   2. in the background on cores 8-15: tools/bench_scale.py's SD-1.5-architecture export with --device cuda
#      (most of it is graph export and onnxruntime parity on the CPU, several minutes);
#   3. meanwhile on cores 0-7: the CUDA tests (libcudart, --device cuda calibration, parity's torch side on the
#      GPU), then the demo's W4A8 reconstruct export on CUDA and on the CPU;
#   4. with `suite`, the rest of the test suite, file by file.
#   run: bash tools/device_check.sh [suite]    (carry: .whl; logs come back under $OUT; the benchmarks run with
#        --no-write, their sections are in the logs)
# Measured 2026-11-30 on nvidia-h200 (gVisor): pytest-xdist workers took minutes to start there and the
# whole suite did not fit in 8 minutes, so files run one by one, without xdist.
set -o pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl 2>&1 | tail -3
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
{ nvidia-smi -L; nproc --all; python3 -c "import torch, onnxruntime, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
pin() { if command -v taskset >/dev/null && [ "$(nproc --all)" -ge 16 ]; then echo taskset -c "$1"; fi; }  # where it can
step() {  # step SECONDS LOG COMMAND...: run it under its limit, its output appended to $OUT/LOG
  local limit=$1 log=$2; shift 2
  echo "== $* (limit ${limit}s, at ${SECONDS}s)" >>"$OUT/$log"
  timeout "$limit" "$@" >>"$OUT/$log" 2>&1
  echo "== exit $? at ${SECONDS}s" >>"$OUT/$log"
}
step 500 bench_sd15.log $(pin 8-15) python3 tools/bench_scale.py --parts sd15 --devices cuda --calib-samples 2 --no-write &
sd15=$!
PYTEST=(python3 -m pytest -q -rs -p no:cacheprovider -p no:benchmark -p no:xdist)
step 170 cuda_tests.log $(pin 0-7) "${PYTEST[@]}" tests/test_cuda.py tests/test_device.py
step 280 bench_demo.log $(pin 0-7) python3 tools/bench_scale.py --parts demo-device --devices cuda,cpu --no-write
wait $sd15
tail -n 4 "$OUT"/*.log
if [ "$1" = suite ]; then
  for file in $(ls tests/test_*.py | grep -v -e test_cuda -e test_device); do
    step 120 suite.log "${PYTEST[@]}" "$file"
  done
fi
