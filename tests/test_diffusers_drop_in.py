"""`stepquant.diffusers.from_bundle`: a bundle's denoiser in place of `pipe.unet` / `pipe.transformer` in diffusers'
own pipelines gives the images stepquant's own runtime gives from the same latents: Stable Diffusion with DDIM and
with DPM-Solver++ (and correction terms), SDXL, PixArt-Sigma; and a whole-pipeline bundle is a ready pipeline."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import FAST, run_cli

from stepquant.bundle import BundleError, load_bundle
from stepquant.diffusers import BundleTransformer, BundleUNet, from_bundle, pipeline_from_bundle
from stepquant.models.tiny import TINY_PROMPTS
from stepquant.runtime.bundle_backends import bundle_corrections, bundle_sampler
from stepquant.runtime.seeding import per_sample_noise, seed_generators
from stepquant.runtime.text_to_image import GenerateRequest, generate_batches

PROMPTS = TINY_PROMPTS[:2]


def _pipeline(cls, directory, bundle, warnings: list[str] | None = None):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    loaded = load_bundle(bundle)
    pipe = cls.from_pretrained(directory, **({"safety_checker": None} if "XL" not in cls.__name__ else {}))
    scheduler = {"ddim": DDIMScheduler, "dpm-solver++": DPMSolverMultistepScheduler}[loaded.manifest.sampler.scheduler]
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    drop_in = from_bundle(loaded, warn=None if warnings is None else warnings.append)
    setattr(pipe, "transformer" if isinstance(drop_in, BundleTransformer) else "unet", drop_in)
    return pipe, loaded


def _compare_with_generate(pipe, loaded, seed: int = 7, negative: str | None = None, **call) -> float:
    """Median abs difference, in [-1, 1] pixels, between the pipeline with the drop-in and `generate_batches` on
    the quantized graph (with the bundle's corrections), from the same latents. Not the max: diffusers' float32
    scheduler and guidance arithmetic and ours differ by an ulp (4.8e-7 at the second step on an AVX-512 EPYC), and
    where that lands on a rounding tie of one quantizer the steps after carry it (7.7e-3 in some pixels there, none
    on an AVX2 one). The median stays at float precision (1.4e-7) unless the calls differ: uncorrected, 3.1e-3."""
    config = bundle_sampler(loaded).overridden(guidance_scale=3.0)
    request = GenerateRequest(PROMPTS, negative, n=2, seed=seed)
    ours = np.concatenate(list(generate_batches(loaded, request, config, progress=False)))
    latents = per_sample_noise(seed_generators(range(seed, seed + request.count)), loaded.manifest.sample_shape)
    with torch.no_grad():
        theirs = pipe(
            list(PROMPTS),
            negative_prompt=negative and [negative] * len(PROMPTS),
            num_images_per_prompt=2,
            num_inference_steps=config.steps,
            guidance_scale=3.0,
            latents=torch.from_numpy(latents),
            output_type="np",
            **call,
        ).images
    difference = np.abs(ours - (theirs.transpose(0, 3, 1, 2) * 2 - 1))
    print(f"drop-in vs generate: max abs {difference.max():.2e}, median {np.median(difference):.2e}")
    return float(np.median(difference))


def test_stable_diffusion_with_the_drop_in_gives_generates_images(text_pipeline, text_bundle):
    from diffusers import StableDiffusionPipeline

    pipe, loaded = _pipeline(StableDiffusionPipeline, text_pipeline / "sd", text_bundle)
    assert isinstance(pipe.unet, BundleUNet) and pipe.unet.config.in_channels == 4 and pipe.unet.config.sample_size == 8
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert _compare_with_generate(pipe, loaded) <= 1e-5
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(901)
    states = torch.randn(2, 16, 32)
    as_tuple = pipe.unet(x, t, encoder_hidden_states=states, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(
        as_tuple[0], pipe.unet(x, t, encoder_hidden_states=states).sample
    )
    original = StableDiffusionPipeline.from_pretrained(text_pipeline / "sd").unet  # the graph is the model: FP32 close
    reference = from_bundle(text_bundle, graph="reference")
    with torch.no_grad():
        expected = original(x, t, encoder_hidden_states=states).sample
    assert (reference(x, t, encoder_hidden_states=states).sample - expected).abs().max() <= 1e-4
    assert (pipe.unet(x, t, encoder_hidden_states=states).sample - expected).abs().max() > 1e-4  # INT8 is not FP32


def test_dpm_solver_with_corrections_through_the_drop_in(text_pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "bundle"
    exported = run_cli(
        "export-quantized",
        "--model",
        text_pipeline / "sd",
        "--prompts-file",
        text_pipeline / "prompts.txt",
        "--out",
        out,
        "--guidance-scale",
        "3",
        "--scheduler",
        "dpm-solver++",
        "--correction",
        "ptqd",
        *FAST,
    )
    assert exported.returncode == 0, exported.stderr
    warnings: list[str] = []
    pipe, loaded = _pipeline(StableDiffusionPipeline, text_pipeline / "sd", out, warnings)
    terms = bundle_corrections(loaded)
    assert terms is not None and not np.allclose(terms.bias, 0)  # corrections that change the estimate
    assert _compare_with_generate(pipe, loaded, negative="a white zero on black") <= 1e-5 and not warnings
    uncorrected = from_bundle(loaded, corrections=False)
    pipe.unet = uncorrected
    assert _compare_with_generate(pipe, loaded, negative="a white zero on black") > 1e-4  # the terms were applied
    pipe.unet = from_bundle(loaded, warn=warnings.append)
    with torch.no_grad():  # 5 steps: timesteps the 4-step terms do not cover
        pipe(list(PROMPTS), num_inference_steps=5, guidance_scale=3.0, output_type="np")
    assert len(warnings) == 1 and "do not cover timestep" in warnings[0]


def test_sdxl_with_the_drop_in_gives_generates_images(sdxl_pipeline):
    from diffusers import StableDiffusionXLPipeline

    pipe, loaded = _pipeline(StableDiffusionXLPipeline, sdxl_pipeline / "pipe", sdxl_pipeline / "bundle")
    assert (
        pipe.unet.add_embedding.linear_1.in_features == 16 + 6 * 8
    )  # what SDXL's pipeline checks its size ids against
    assert _compare_with_generate(pipe, loaded) <= 1e-5


def test_a_whole_pipeline_bundle_is_a_ready_diffusers_pipeline(text_bundle, sdxl_pipeline):
    """`pipeline_from_bundle`: diffusers' own StableDiffusion(XL)Pipeline made of the bundle's tokenizers, text
    encoders, denoiser and VAE decoder, no pipeline directory needed, gives `generate`'s images."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    for path, kind in ((text_bundle, StableDiffusionPipeline), (sdxl_pipeline / "bundle", StableDiffusionXLPipeline)):
        loaded = load_bundle(path)
        pipe = pipeline_from_bundle(loaded)
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe) is kind and pipe.vae_scale_factor == loaded.manifest.text_to_image.vae_scale_factor == 2
        assert _compare_with_generate(pipe, loaded) <= 1e-5  # measured 8.9e-8 (SD), 1.2e-7 (SDXL)
    pipe = pipeline_from_bundle(text_bundle)
    pipe.set_progress_bar_config(disable=True)
    pipe.tokenizer.pad_token = pipe.tokenizer.convert_ids_to_tokens(0)  # the fault: padding with another token
    assert _compare_with_generate(pipe, load_bundle(text_bundle)) > 1e-4


def test_pixart_sigma_with_the_drop_in_gives_generates_images(pixart_pipeline):
    """The transformer drop-in in diffusers' own PixArtSigmaPipeline (its T5 encoder in torch), and the whole
    PixArt bundle as a ready PixArtSigmaPipeline, both give `generate`'s images."""
    from diffusers import PixArtSigmaPipeline

    call = {"clean_caption": False, "use_resolution_binning": False}
    pipe, loaded = _pipeline(PixArtSigmaPipeline, pixart_pipeline / "pipe", pixart_pipeline / "bundle")
    assert isinstance(pipe.transformer, BundleTransformer) and pipe.transformer.config.out_channels == 4  # noise half
    assert _compare_with_generate(pipe, loaded, negative="a white zero on black", **call) <= 1e-5
    ready = pipeline_from_bundle(loaded)
    ready.set_progress_bar_config(disable=True)
    assert type(ready) is PixArtSigmaPipeline and isinstance(ready.transformer, BundleTransformer)
    assert _compare_with_generate(ready, loaded, negative="a white zero on black", **call) <= 1e-5
    ready.transformer = from_bundle(loaded, corrections=False, graph="reference")  # the fault: another denoiser
    assert _compare_with_generate(ready, loaded, negative="a white zero on black", **call) > 1e-4


def test_the_drop_in_refuses_what_it_cannot_run(text_bundle, demo_bundle):
    with pytest.raises(ValueError, match="graph must be one of quantized, reference"):
        from_bundle(text_bundle, graph="fp16")
    unet = from_bundle(text_bundle)
    with pytest.raises(ValueError, match="takes no mid_block_additional_residual"):  # a ControlNet's residuals
        unet(
            torch.randn(1, 4, 8, 8),
            1,
            encoder_hidden_states=torch.randn(1, 16, 32),
            mid_block_additional_residual=torch.randn(1, 64, 4, 4),
        )
    loaded = load_bundle(demo_bundle[0])
    assert from_bundle(loaded).config["_class_name"] == "UNet2DModel"
    older = dataclasses.replace(loaded, manifest=dataclasses.replace(loaded.manifest, denoiser_config=None))
    with pytest.raises(BundleError, match="carries no denoiser config"):
        from_bundle(older)
    assert from_bundle(older, config={"_class_name": "UNet2DModel"}).config["_class_name"] == "UNet2DModel"

    with pytest.raises(BundleError, match="no tokenizer or text encoder"):
        pipeline_from_bundle(loaded)
