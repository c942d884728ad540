"""Samplers chosen at run time: a bundle stores several (`--sampler` at export, `stepquant add-sampler` later),
each with its own table and correction terms; sample/generate take any stored one and refuse others by name."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FEW_STEPS, assert_one_line_error, run_cli

from stepquant.bundle import load_bundle
from stepquant.bundle.reader import SIGNATURE
from stepquant.bundle.signing import generate_keypair
from stepquant.diffusers import from_bundle
from stepquant.export.config import CalibrationConfig, ChecksConfig, CorrectionConfig
from stepquant.export.samplers import add_sampler, sampler_quality
from stepquant.models.schedulers import capture_table
from stepquant.pipeline import ExportConfig, export_quantized
from stepquant.runtime import sample
from stepquant.runtime.bundle_backends import (
    bundle_corrections,
    bundle_sampler,
    bundle_table,
    quantized_backend,
    reference_backend,
)
from stepquant.runtime.guidance import choose_conditioning
from stepquant.runtime.sampler import SamplerConfig
from stepquant.runtime.scheduler_table import SchedulerTableError

DDIM, DPM, EULER = FEW_STEPS, SamplerConfig("dpm-solver++", 4), SamplerConfig("euler", 5)
SMALL = {"calibration": CalibrationConfig(samples=8), "checks": ChecksConfig(eval_samples=4), "progress": False}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("ddim:25", SamplerConfig("ddim", 25)),
        ("dpm-solver++:20:karras", SamplerConfig("dpm-solver++", 20, karras_sigmas=True)),
        ("ddim:50:eta=1", SamplerConfig("ddim", 50, eta=1.0)),
    ],
)
def test_sampler_specs_parse_and_print_back(spec, expected):
    assert SamplerConfig.parse(spec) == expected and expected.spec == spec


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("ddim", "does not parse"),
        ("ddim:x", "does not parse"),
        ("ddim:4:fast", "does not parse"),
        ("ddim:4:eta=z", "does not parse"),
        ("foo:4", "unknown scheduler 'foo'"),
        ("euler:4:eta=1", "has no eta"),
    ],
)
def test_a_sampler_spec_that_does_not_parse_is_one_line(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        SamplerConfig.parse(spec)


def _samples(bundle, config: SamplerConfig, conditioning=None) -> np.ndarray:
    return sample(
        quantized_backend(bundle),
        bundle_table(bundle, config),
        range(6),
        bundle.manifest.sample_shape,
        config,
        progress=False,
        corrections=bundle_corrections(bundle, config),
        conditioning=conditioning,
    ).samples


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_bundle_of_three_samplers_samples_each_as_one_sampler_bundles_with_added_samplers_do(tmp_path):
    """Calibration follows the first sampler, so a three-sampler export has the graphs of a one-sampler export
    of that sampler, and `add-sampler` gives that bundle the other two tables: every sampler samples the same."""
    three = load_bundle(
        export_quantized(ExportConfig(out=tmp_path / "three", sampler=DDIM, more_samplers=(DPM, EULER), **SMALL)).bundle
    )
    one = load_bundle(export_quantized(ExportConfig(out=tmp_path / "one", sampler=DDIM, **SMALL)).bundle)
    assert _sha(three.file("model.onnx")) == _sha(one.file("model.onnx"))
    grown = add_sampler(add_sampler(one, DPM, progress=False), EULER, progress=False)
    assert (
        [e.sampler.spec for e in grown.manifest.samplers]
        == [e.sampler.spec for e in three.manifest.samplers]
        == ["ddim:4", "dpm-solver++:4", "euler:5"]
    )
    by_sampler = {}
    for config in (DDIM, DPM, EULER):
        assert three.manifest.stored(config.key).scheduler_table == grown.manifest.stored(config.key).scheduler_table
        by_sampler[config.spec] = _samples(three, config)
        np.testing.assert_array_equal(by_sampler[config.spec], _samples(grown, config))
    np.testing.assert_array_equal(by_sampler["ddim:4"], _samples(one, DDIM))
    assert np.abs(by_sampler["euler:5"] - by_sampler["ddim:4"]).max() > 1e-2  # three samplers, not one table thrice
    assert bundle_sampler(three, scheduler="euler") == EULER and bundle_sampler(three) == DDIM


def test_every_stored_sampler_carries_its_psnr_to_fp(tmp_path):
    """The export measures each stored sampler on the first target (FP from torch); add-sampler measures the one it
    adds the same way against the FP32 reference graph, so on the same graph and seeds the two figures agree."""
    two = load_bundle(
        export_quantized(ExportConfig(out=tmp_path / "two", sampler=DDIM, more_samplers=(EULER,), **SMALL)).bundle
    )
    one = load_bundle(export_quantized(ExportConfig(out=tmp_path / "one", sampler=DDIM, **SMALL)).bundle)
    exported = two.manifest.stored(EULER.key).quality
    added = add_sampler(one, EULER, progress=False).manifest.stored(EULER.key).quality
    assert exported["samples"] == added["samples"] == 4 and exported["seeds"] == added["seeds"] == [0, 3]
    assert (
        two.manifest.samplers[0].quality["psnr_to_fp_db_mean"]
        == two.target("tensorrt").details["quality"]["psnr_to_fp_db_mean"]
    )
    assert (
        25 < exported["psnr_to_fp_db_mean"] < 80
        and abs(exported["psnr_to_fp_db_mean"] - added["psnr_to_fp_db_mean"]) < 0.05
    )
    # the fault the agreement must catch: a figure measured on another sampler's table
    wrong = sampler_quality(
        reference_backend(one),
        quantized_backend(one),
        bundle_table(one, DDIM),
        DDIM,
        range(4),
        one.manifest.sample_shape,
        latent=False,
        progress=False,
    )
    assert abs(wrong["psnr_to_fp_db_mean"] - added["psnr_to_fp_db_mean"]) > 0.05


def test_added_samplers_get_their_own_correction_terms_fitted_from_the_bundle(tmp_path):
    """A guided class-conditional bundle with PTQD terms: `add-sampler` fits the new sampler's terms from the
    bundle's FP32 and Q/DQ graphs on onnxruntime (the export fits them against torch); they agree with an export
    that stored that sampler from the start to within a fraction of the terms' own size."""
    guided = {"model": "demo-digits-cond", "correction": CorrectionConfig("ptqd"), **SMALL}
    ddim, dpm = (SamplerConfig(c.scheduler, c.steps, guidance_scale=3.0) for c in (DDIM, DPM))
    both = load_bundle(
        export_quantized(ExportConfig(out=tmp_path / "both", sampler=ddim, more_samplers=(dpm,), **guided)).bundle
    )
    result = run_cli(
        "stepquant",
        "add-sampler",
        "--bundle",
        export_quantized(ExportConfig(out=tmp_path / "one", sampler=ddim, **guided)).bundle,
        "--sampler",
        "dpm-solver++:4",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "added dpm-solver++:4 with ptqd terms" in result.stdout and "quality: PSNR to FP" in result.stdout
    added = load_bundle(tmp_path / "one")
    assert [e.correction_file for e in added.manifest.samplers] == [
        "corrections.safetensors",
        "corrections_1.safetensors",
    ]
    exported, fitted = bundle_corrections(both, dpm), bundle_corrections(added, dpm)
    np.testing.assert_array_equal(exported.timesteps, fitted.timesteps)
    for term, identity in (("gain", 1.0), ("bias", 0.0)):
        size = np.abs(getattr(exported, term) - identity).max()
        assert np.abs(getattr(fitted, term) - getattr(exported, term)).max() < 0.5 * size, term  # measured 0.25, 0.11
    assert not np.array_equal(bundle_corrections(added, ddim).timesteps, fitted.timesteps)  # its own timesteps
    rows = choose_conditioning(added.manifest.conditions, "test", class_table=added.file(added.manifest.class_table))
    samples = _samples(added, bundle_sampler(added, scheduler="dpm-solver++", guidance_scale=3.0), rows)
    assert np.isfinite(samples).all() and samples.shape == (6, 1, 16, 16)


def test_added_samplers_join_the_timestep_groups_of_their_nearest_timesteps(tmp_path):
    grouped = load_bundle(
        export_quantized(
            ExportConfig(
                out=tmp_path / "g",
                sampler=SamplerConfig("ddim", 6),
                **{**SMALL, "calibration": CalibrationConfig(samples=8, timestep_groups=2)},
            )
        ).bundle
    )
    grown = add_sampler(grouped, EULER, progress=False)
    served = [t for group in grown.target("tensorrt").timestep_groups for t in group.timesteps]
    euler = bundle_table(grown, EULER).timesteps.tolist()
    assert len(served) == len(set(served)) and set(euler) <= set(served)
    assert np.isfinite(_samples(grown, EULER)).all()


def test_bad_sampler_requests_are_one_line_and_write_nothing(demo_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(demo_bundle[0], bundle)
    out = tmp_path / "x.png"
    unstored = run_cli("stepquant", "sample", "--bundle", bundle, "--n", 1, "--sampler", "euler:30", "--out", out)
    assert_one_line_error(unstored, "stores no 30 EULER steps sampler; it stores ddim:4")
    assert_one_line_error(
        run_cli("stepquant", "sample", "--bundle", bundle, "--n", 1, "--sampler", "ddim:4", "--steps", 4, "--out", out),
        "give --sampler, or --scheduler",
    )
    with pytest.raises(ValueError, match="stores no 9 EULER steps sampler"):
        from_bundle(bundle, sampler="euler:9")
    assert_one_line_error(
        run_cli("stepquant", "add-sampler", "--bundle", bundle, "--sampler", "euler:x"), "does not parse"
    )
    assert_one_line_error(
        run_cli("stepquant", "add-sampler", "--bundle", bundle, "--sampler", "ddim:4"), "stores ddim:4 already"
    )
    assert_one_line_error(
        run_cli("export-quantized", "--out", tmp_path / "e", "--sampler", "ddim:4", "--sampler", "ddim:4"),
        "--sampler ddim:4 is given twice",
    )
    assert_one_line_error(
        run_cli("export-quantized", "--out", tmp_path / "e", "--sampler", "ddim:4", "--steps", 8),
        "give --sampler, or --scheduler",
    )
    private, public = generate_keypair(tmp_path / "keys")
    assert run_cli("stepquant", "sign", "--bundle", bundle, "--key", private).returncode == 0
    before = {p: _sha(p) for p in bundle.rglob("*") if p.is_file()}
    assert_one_line_error(
        run_cli("stepquant", "add-sampler", "--bundle", bundle, "--sampler", "euler:5"),
        "is signed and its manifest changes: pass --sign-key",
    )
    assert (
        {p: _sha(p) for p in bundle.rglob("*") if p.is_file()} == before
        and not out.exists()
        and not (tmp_path / "e").exists()
    )
    signed = run_cli("stepquant", "add-sampler", "--bundle", bundle, "--sampler", "euler:5", "--sign-key", private)
    assert signed.returncode == 0 and "signed again" in signed.stdout
    assert load_bundle(bundle, public).manifest.stored(EULER.key) is not None and (bundle / SIGNATURE).exists()


def test_a_sampler_diffusers_itself_cannot_step_is_one_line():
    """DPM-Solver++ with Karras sigmas on a cosine schedule: diffusers merges duplicate timesteps, then indexes
    past its sigmas; a sampler given at export or to add-sampler gets one line, not diffusers' traceback."""
    cosine = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
    with pytest.raises(
        SchedulerTableError, match="diffusers' dpm-solver\\+\\+ scheduler fails on this model's noise schedule"
    ):
        capture_table(SamplerConfig.parse("dpm-solver++:15:karras"), cosine)
    assert len(capture_table(SamplerConfig.parse("dpm-solver++:15"), cosine).timesteps) == 15
