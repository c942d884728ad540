#!/usr/bin/env bash
# Both targets from one calibration; TensorRT's rules checked without TensorRT; the engine command it would run.
set -euo pipefail
OUT=${OUT:-out/examples}
export-quantized --target tensorrt --target onnxruntime-cpu --out "$OUT/targets" --overwrite --no-progress ${FAST:-}
stepquant lint "$OUT/targets"
grep -m1 -- "--onnx" "$OUT/targets/build_engine.sh"
stepquant bench --bundle "$OUT/targets" --batch 8 --seconds 0.5
