"""TensorRT engine building: the trtexec commands every bundle carries (build_engine.sh, for TensorRT
10.x and 11.x, so a Jetson needs only the bundle and TensorRT), and an in-process strongly typed build
through Polygraphy's TensorRT loaders when `tensorrt` is installed."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

from stepquant.runtime.bundle_backends import plan_file
from stepquant.runtime.tensorrt_backend import tensorrt_version

TIMING_CACHE_FILE = "timing.cache"
BUILDER_OPTIMIZATION_LEVEL = 4  # what modelopt and demoDiffusion use for quantized builds

# trtexec flags this project emits, as documented for each major version. 11.0 removed weak typing
# (--int8, --fp16, --best are gone, Q/DQ in the ONNX is the only INT8 path) and made every network
# strongly typed, so --stronglyTyped is needed on 10.x and a no-op on 11.x.
TRTEXEC_FLAGS: dict[int, frozenset[str]] = {
    10: frozenset(
        {
            "--onnx",
            "--saveEngine",
            "--minShapes",
            "--optShapes",
            "--maxShapes",
            "--stronglyTyped",
            "--timingCacheFile",
            "--builderOptimizationLevel",
            "--skipInference",
        }
    ),
    11: frozenset(
        {
            "--onnx",
            "--saveEngine",
            "--minShapes",
            "--optShapes",
            "--maxShapes",
            "--timingCacheFile",
            "--builderOptimizationLevel",
            "--skipInference",
        }
    ),
}
REMOVED_IN_11 = frozenset({"--int8", "--fp16", "--best", "--calib"})


# {input name: {min|opt|max: shape}}, from ShapeProfile.input_shapes
InputShapes = dict[str, dict[str, tuple[int, ...]]]


def _shape_flag(shapes: InputShapes, which: str) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, bounds[which]))}" for name, bounds in shapes.items())


def trtexec_command(major: int, onnx_file: str, shapes: InputShapes) -> list[str]:
    """The trtexec argument list that builds a strongly typed engine from a Q/DQ graph for `shapes`."""
    if major not in TRTEXEC_FLAGS:
        raise ValueError(f"TensorRT {major}.x is not supported; stepquant targets {sorted(TRTEXEC_FLAGS)}")
    command = [
        "trtexec",
        f"--onnx={onnx_file}",
        f"--saveEngine={plan_file(onnx_file)}",
        f"--minShapes={_shape_flag(shapes, 'min')}",
        f"--optShapes={_shape_flag(shapes, 'opt')}",
        f"--maxShapes={_shape_flag(shapes, 'max')}",
        f"--timingCacheFile={TIMING_CACHE_FILE}",
        f"--builderOptimizationLevel={BUILDER_OPTIMIZATION_LEVEL}",
        "--skipInference",
    ]
    if major == 10:
        command.insert(2, "--stronglyTyped")
    return command


def build_script(graphs: Mapping[str, InputShapes]) -> str:
    """build_engine.sh: picks the commands (one engine per graph, each with its own shape profile: the denoiser's
    and, in a whole-pipeline bundle, the text encoders' and the VAE decoder's) for the installed TensorRT major
    version."""
    onnx_files = list(graphs)

    def line(major: int) -> str:
        return " && ".join(
            '"$TRTEXEC" ' + " ".join(shlex.quote(arg) for arg in trtexec_command(major, f, shapes)[1:])
            for f, shapes in graphs.items()
        )

    plans = " ".join(plan_file(f) for f in onnx_files)
    return f"""#!/usr/bin/env bash
# Build this bundle's TensorRT engine(s) on the machine that will run it (engines are specific to the GPU
# and the TensorRT version; on Jetson, build on the Jetson). Needs TensorRT 10.x or 11.x.
#   TRTEXEC=/usr/src/tensorrt/bin/trtexec ./build_engine.sh     (JetPack's location)
#   TRT_MAJOR=10 ./build_engine.sh                               (skip version detection)
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-trtexec}}"
major="${{TRT_MAJOR:-}}"
if [ -z "$major" ]; then
  major="$(python3 -c 'import tensorrt; print(tensorrt.__version__.split(".")[0])' 2>/dev/null || true)"
fi
if [ -z "$major" ]; then
  version="$("$TRTEXEC" --help 2>&1 | sed -n 's/.*TensorRT v\\([0-9][0-9]*\\).*/\\1/p' | head -n 1 || true)"
  # TensorRT >= 10 prints MAJOR*10000+MINOR*100+PATCH (v100300), TensorRT 8 MAJOR*1000+... (v8601)
  if [ "${{#version}}" -ge 6 ]; then
    major=$((10#$version / 10000))
  elif [ -n "$version" ]; then
    major=$((10#$version / 1000))
  fi
fi
case "$major" in
  10) {line(10)} ;;
  11) {line(11)} ;;
  *)
    echo "build_engine.sh: TensorRT 10.x or 11.x is needed (found '${{major:-none}}'); set TRTEXEC or TRT_MAJOR" >&2
    exit 1 ;;
esac
echo "built {plans} with TensorRT $major.x"
"""


def build_engine(onnx_path: Path, engine_path: Path, shapes: InputShapes, timing_cache: Path) -> str:
    """Build a strongly typed engine with Polygraphy's loaders; returns the TensorRT version used."""
    version = tensorrt_version()
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    trt_profile = Profile()
    for name, bounds in shapes.items():
        trt_profile.add(name, min=bounds["min"], opt=bounds["opt"], max=bounds["max"])
    config = CreateConfig(
        profiles=[trt_profile],
        builder_optimization_level=BUILDER_OPTIMIZATION_LEVEL,
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
    )
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    SaveEngine(EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache)), path=str(engine_path))()
    return version


def build_engines(directory: Path, graphs: Mapping[str, InputShapes]) -> dict:
    """Build the plan of every graph in `directory`, each for its shapes (sharing one timing cache); returns the
    manifest's engine entry's plans and version."""
    version = ""
    for graph, shapes in graphs.items():
        version = build_engine(directory / graph, directory / plan_file(graph), shapes, directory / TIMING_CACHE_FILE)
    return {"plans": [plan_file(g) for g in graphs], "tensorrt_version": version}
