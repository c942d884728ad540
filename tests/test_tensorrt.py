"""The TensorRT path: generated trtexec commands against the documented flags of 10.x and 11.x, the
build script's version dispatch, and, where TensorRT is installed, engine build, backend and parity."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli

from stepquant.bundle import load_bundle
from stepquant.export.shapes import DimRange, ShapeProfile
from stepquant.export.tensorrt import REMOVED_IN_11, TRTEXEC_FLAGS, build_script, trtexec_command

SHAPES = ShapeProfile(DimRange(1, 8, 64)).resolved((1, 16, 16), None).input_shapes(1, ())


def flags(command: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) if "=" in arg else (arg, "") for arg in command[1:])


@pytest.mark.parametrize("major", [10, 11])
def test_commands_use_only_documented_flags(major):
    command = trtexec_command(major, "model.onnx", SHAPES)
    used = flags(command)
    assert command[0] == "trtexec"
    assert set(used) <= TRTEXEC_FLAGS[major]
    assert not set(used) & REMOVED_IN_11  # weak typing flags: gone in 11, wrong for Q/DQ graphs in 10
    assert used["--onnx"] == "model.onnx" and used["--saveEngine"] == "model.plan"
    assert used["--minShapes"] == "sample:1x1x16x16,timestep:1"
    assert used["--optShapes"] == "sample:8x1x16x16,timestep:8"
    assert used["--maxShapes"] == "sample:64x1x16x16,timestep:64"
    assert ("--stronglyTyped" in used) == (major == 10)  # a no-op on 11.x, where every network is strongly typed


def test_unsupported_versions_and_profiles_are_refused():
    with pytest.raises(ValueError, match="TensorRT 9.x"):
        trtexec_command(9, "model.onnx", SHAPES)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        DimRange(8, 4, 16)


@pytest.fixture
def script_dir(tmp_path):
    (tmp_path / "build_engine.sh").write_text(build_script({"model.onnx": SHAPES}))
    (tmp_path / "build_engine.sh").chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # a stand-in trtexec that reports a version and records its arguments (it builds nothing)
    (bin_dir / "trtexec").write_text(
        '#!/usr/bin/env bash\nif [ "$1" = "--help" ]; then echo "&&&& RUNNING '
        'TensorRT.trtexec [TensorRT v${FAKE_TRT_VERSION}] # trtexec --help"; exit 0; fi\n'
        'echo "$@" > "$(dirname "$0")/args"\n'
    )
    (bin_dir / "python3").write_text("#!/usr/bin/env bash\nexit 1\n")  # no tensorrt module to ask
    for tool in ("trtexec", "python3"):
        (bin_dir / tool).chmod(0o755)
    return tmp_path


def run_script(directory: Path, **env):
    environment = {**os.environ, "PATH": f"{directory / 'bin'}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(directory / "build_engine.sh")], capture_output=True, text=True, env=environment)


def test_build_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", "-c", build_script({"model.onnx": SHAPES})]).returncode == 0


@pytest.mark.parametrize("version, major", [("100300", 10), ("110100", 11)])
def test_build_script_picks_the_command_of_the_installed_version(script_dir, version, major):
    result = run_script(script_dir, FAKE_TRT_VERSION=version)
    assert result.returncode == 0, result.stderr
    recorded = shlex.split((script_dir / "bin" / "args").read_text())
    assert recorded == trtexec_command(major, "model.onnx", SHAPES)[1:]
    assert f"TensorRT {major}.x" in result.stdout


def test_build_script_refuses_other_versions(script_dir):
    result = run_script(script_dir, FAKE_TRT_VERSION="8601")
    assert result.returncode == 1 and "TensorRT 10.x or 11.x is needed (found '8')" in result.stderr
    assert run_script(script_dir, TRT_MAJOR="10", FAKE_TRT_VERSION="8601").returncode == 0


def test_every_bundle_carries_the_build_script(demo_bundle):
    bundle = load_bundle(demo_bundle[0])
    script = bundle.file("build_engine.sh").read_text()
    assert script == build_script(
        {"model.onnx": ShapeProfile.from_dict(bundle.manifest.shape_profile).input_shapes(1, ())}
    )
    assert bundle.manifest.engine["input_shapes"]["sample"]["max"] == [64, 1, 16, 16]
    assert os.access(bundle.file("build_engine.sh"), os.X_OK)
    assert bundle.manifest.engine["build_script"] == "build_engine.sh"


def test_tensorrt_commands_fail_clearly_without_tensorrt(demo_bundle):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; the error path is for machines without it")
    except ImportError:
        pass
    for args in (
        ["build-engine", "--bundle", demo_bundle[0]],
        ["parity", "--bundle", demo_bundle[0], "--backend", "tensorrt"],
        ["sample", "--bundle", demo_bundle[0], "--backend", "tensorrt", "--n", "1", "--out", "unused.npz"],
    ):
        assert_one_line_error(run_cli("stepquant", *args), "TensorRT is not installed")


# Everything below needs TensorRT and an NVIDIA GPU; it runs as-is on such a machine. Its command lines are
# checked everywhere (test_tensorrt_only_command_lines_parse), so a renamed option fails here, not there.
BUILD_ARGS = ["build-engine", "--bundle", "{bundle}", "--batch-range", "1:8:16"]
SAMPLE_ARGS = [
    "sample",
    "--bundle",
    "{bundle}",
    "--backend",
    "tensorrt",
    "--n",
    "2",
    "--steps",
    "4",
    "--out",
    "{out}",
    "--no-progress",
]


def _filled(args: list[str], **values) -> list[str]:
    return [arg.format(**values) for arg in args]


def test_tensorrt_only_command_lines_parse(tmp_path):
    """The TensorRT tests' command lines are valid for today's CLI (parsed by its own click commands)."""
    from stepquant.cli.main import click_command

    for args in (BUILD_ARGS, SAMPLE_ARGS):
        filled = _filled(args, bundle=tmp_path, out=tmp_path / "trt.npz")
        click_command(filled[0]).make_context(filled[0], filled[1:])  # raises on an unknown option or a bad value


needs_tensorrt = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True).returncode != 0,
    reason="TensorRT is not installed (pip install tensorrt, or JetPack on Jetson); these tests build and run engines",
)


@needs_tensorrt
def test_engine_build_tensorrt_backend_and_parity_replay(demo_bundle, tmp_path):
    import shutil

    import torch

    from stepquant.eval import psnr
    from stepquant.export.parity import replay_parity
    from stepquant.runtime import SamplerConfig, sample
    from stepquant.runtime.bundle_backends import bundle_table, quantized_backend
    from stepquant.runtime.tensorrt_backend import TensorRTBackend

    path = tmp_path / "bundle"
    shutil.copytree(demo_bundle[0], path)
    stepquant = Path(sys.executable).parent / "stepquant"
    result = subprocess.run([str(stepquant), *_filled(BUILD_ARGS, bundle=path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    bundle = load_bundle(path)
    assert bundle.manifest.engine["tensorrt_version"] and bundle.file("model.plan").stat().st_size > 0
    report = replay_parity(bundle, "tensorrt")  # end to end, at the replay tolerance the export recorded
    assert report.passed, report.to_dict()
    config = SamplerConfig(steps=4)
    table, shape = bundle_table(bundle), bundle.manifest.sample_shape
    by_trt = sample(TensorRTBackend(bundle.file("model.plan")), table, range(8), shape, config, progress=False)
    by_ort = sample(quantized_backend(bundle), table, range(8), shape, config, progress=False)
    assert float(psnr(by_trt.samples, by_ort.samples).mean()) > 30.0
    assert torch.isfinite(by_trt.samples).all()
    out = tmp_path / "trt.npz"
    sampled = subprocess.run(
        [str(stepquant), *_filled(SAMPLE_ARGS, bundle=path, out=out)], capture_output=True, text=True
    )
    assert sampled.returncode == 0 and out.is_file(), sampled.stderr
