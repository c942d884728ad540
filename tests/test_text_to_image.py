"""Whole text-to-image bundles: a Stable Diffusion pipeline directory (tokenizer, CLIP text encoder, VAE, UNet)
exports with --prompts-file into a bundle that carries every part, and `stepquant generate` turns prompts into
PNGs on the runtime alone: the same pixels as the full install, and, on the FP32 reference graph, diffusers'
own StableDiffusionPipeline's images from the same latents (and StableDiffusionXLPipeline's and
PixArtSigmaPipeline's for their tiny pipelines)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import FAST, assert_one_line_error, run_cli
from PIL import Image
from test_runtime_install import stepquant_without_export_side

from stepquant.bundle import BundleError, load_bundle
from stepquant.bundle.manifest import Manifest
from stepquant.export.faults import forge_bundle
from stepquant.export.pipeline_parts import export_tokenizer
from stepquant.models.clip_tokenizer import save_clip_tokenizer
from stepquant.models.tiny import TINY_PROMPTS, save_tiny_text_pipeline
from stepquant.runtime.bundle_backends import bundle_sampler
from stepquant.runtime.seeding import per_sample_noise, seed_generators
from stepquant.runtime.text_to_image import GenerateRequest, generate_batches, load_tokenizer

GOLDEN = [
    "a red seven on a blue background",
    "",
    "THE Digit 7, in RED!!! (blue paper)...",
    "ünïcödé ✓ 東京 — naïve café",
    "a " * 40 + "seven",
    "  spaces\tand\nnewlines  ",
    "7777777777777777777777",
    "it's the dog's; we'll see",
]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_bundle_carries_every_part_of_the_pipeline(text_bundle):
    loaded = load_bundle(text_bundle, strict=True)
    parts = loaded.manifest.text_to_image
    (encoder,) = parts.encoders
    assert (encoder.tokenizer, encoder.graph, parts.vae_decoder) == (
        "tokenizer/tokenizer.json",
        "text_encoder/model.onnx",
        "vae_decoder/model.onnx",
    )
    assert (
        encoder.max_length == 16 and not encoder.pooled and parts.scaling_factor == 0.5 and not parts.fixed_conditions
    )
    assert all(check["worst_abs_error_relative_to_max"] <= check["tolerance"] for check in parts.checks.values())
    assert {encoder.tokenizer, encoder.graph, parts.vae_decoder} <= set(loaded.manifest.files)
    quality = loaded.target("tensorrt").details["quality"]
    assert quality["space"] == "image" and quality["psnr_data_range"] == 2.0  # measured on decoded images
    assert Image.open(text_bundle / "preview.png").height == 4 * (
        16 + 2
    )  # the preview shows 16 px images, not 8 px latents


@pytest.mark.parametrize("pad", [None, "!"])  # SD 1.x pads with EOS; SD 2.x and SDXL's second tokenizer with "!"
def test_the_device_tokenizer_gives_clip_tokenizers_ids(tmp_path, pad):
    from transformers import CLIPTokenizer

    directory = save_clip_tokenizer(tmp_path / "pipe" / "tokenizer", TINY_PROMPTS, merges=60, max_length=16)
    if pad:
        CLIPTokenizer.from_pretrained(directory, pad_token=pad).save_pretrained(directory)
    staging = tmp_path / "staging"
    staging.mkdir()
    reference, max_length, pad_id = export_tokenizer(tmp_path / "pipe", staging, GOLDEN)
    assert pad_id == (reference.convert_tokens_to_ids(pad) if pad else reference.eos_token_id)
    device = load_tokenizer(staging / "tokenizer" / "tokenizer.json", max_length, pad_id)
    for prompt in GOLDEN:
        expected = reference(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
        ids = device.encode(prompt).ids
        assert ids == expected, prompt
        assert ids[0] == reference.bos_token_id and reference.eos_token_id in ids  # truncation keeps BOS and EOS
    assert device.encode("a " * 40).ids[-1] == reference.eos_token_id


def test_generate_without_the_export_side_gives_the_same_pixels(text_bundle, tmp_path):
    args = [
        "generate",
        "--bundle",
        text_bundle,
        "--prompt",
        TINY_PROMPTS[0],
        "--prompt",
        TINY_PROMPTS[1],
        "--n",
        "2",
        "--seed",
        "5",
        "--no-progress",
    ]
    full = run_cli("stepquant", *args, "--out", tmp_path / "full.png")
    assert full.returncode == 0, full.stderr
    device = stepquant_without_export_side(*args, "--out", tmp_path / "device.png")
    assert device.returncode == 0, device.stderr
    assert "wrote 4 images" in device.stdout and np.array_equal(
        _pixels(tmp_path / "full.png"), _pixels(tmp_path / "device.png")
    )
    import stepquant

    api = stepquant.generate(text_bundle, TINY_PROMPTS[:2], n=2, seed=5)  # the Python API: the same images
    assert api.shape == (4, 16, 16, 3) and api.dtype == np.uint8
    first = _pixels(tmp_path / "full.png")[8 : 8 + 128, 8 : 8 + 128].astype(int)  # the grid: a 1 px frame, upscaled 8x
    assert np.abs(first - np.asarray(Image.fromarray(api[0]).resize((128, 128), Image.NEAREST), dtype=int)).max() <= 1
    folder = stepquant_without_export_side(*args, "--out", tmp_path / "images")
    assert folder.returncode == 0, folder.stderr
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"image-{i:04d}.png" for i in range(4)]


def test_the_reference_graph_reproduces_diffusers_pipeline(text_pipeline, text_bundle):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    loaded = load_bundle(text_bundle)
    config = bundle_sampler(loaded).overridden(guidance_scale=3.0)
    prompts = TINY_PROMPTS[:2]
    request = GenerateRequest(prompts, n=2, seed=11, graph="reference")
    ours = np.concatenate(list(generate_batches(loaded, request, config, progress=False)))
    pipe = StableDiffusionPipeline.from_pretrained(text_pipeline / "sd", safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = per_sample_noise(seed_generators(range(11, 11 + request.count)), loaded.manifest.sample_shape)
    with torch.no_grad():
        theirs = pipe(
            list(prompts),
            num_images_per_prompt=2,
            num_inference_steps=config.steps,
            guidance_scale=3.0,
            latents=torch.from_numpy(latents),
            output_type="np",
        ).images
    theirs = theirs.transpose(0, 3, 1, 2) * 2 - 1
    print(f"reference graph vs diffusers: max abs {np.abs(ours - theirs).max():.2e}")
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1e-3
    assert np.abs(ours[0] - ours[2]).max() > 0.05  # the prompts matter: a test of the text path, not of the VAE alone
    quantized = np.concatenate(
        list(generate_batches(loaded, GenerateRequest(prompts, n=2, seed=11), config, progress=False))
    )
    assert np.abs(quantized - theirs).max() > 1e-3  # the tolerance tells an INT8 denoiser from the FP one
    if importlib.util.find_spec("openvino"):  # the whole pipeline (text encoder, denoiser, VAE) on OpenVINO
        on_openvino = np.concatenate(
            list(generate_batches(loaded, request, config, backend="openvino", progress=False))
        )
        assert np.abs(on_openvino - theirs).max() <= 1e-3


def test_sdxl_bundles_carry_both_encoders_and_match_diffusers(sdxl_pipeline):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    loaded = load_bundle(sdxl_pipeline / "bundle", strict=True)
    parts = loaded.manifest.text_to_image
    assert [e.graph for e in parts.encoders] == ["text_encoder/model.onnx", "text_encoder_2/model.onnx"]
    assert (
        [e.pooled for e in parts.encoders] == [False, True]
        and parts.zero_negative
        and parts.fixed_conditions == {"time_ids": (16, 16, 0, 0, 16, 16)}
    )
    legacy = json.loads((sdxl_pipeline / "bundle" / "manifest.json").read_text())  # 0.4.0 wrote 'time_ids'
    legacy["text_to_image"]["time_ids"] = legacy["text_to_image"].pop("fixed_conditions")["time_ids"]
    assert Manifest.from_dict(legacy).text_to_image.fixed_conditions == parts.fixed_conditions
    second = CLIPTokenizer.from_pretrained(sdxl_pipeline / "pipe" / "tokenizer_2")
    assert parts.encoders[1].pad_id == second.convert_tokens_to_ids("!") != parts.encoders[0].pad_id
    device = load_tokenizer(
        loaded.file(parts.encoders[1].tokenizer), parts.encoders[1].max_length, parts.encoders[1].pad_id
    )
    for prompt in GOLDEN:
        assert (
            device.encode(prompt).ids == second(prompt, padding="max_length", max_length=16, truncation=True).input_ids
        )
    config = bundle_sampler(loaded).overridden(guidance_scale=3.0)
    prompts = TINY_PROMPTS[:2]
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline / "pipe")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(per_sample_noise(seed_generators(range(3, 7)), loaded.manifest.sample_shape))
    for negative in (None, "a white zero on black"):  # None: SDXL's zero embeddings (force_zeros_for_empty_prompt)
        request = GenerateRequest(prompts, negative, n=2, seed=3, graph="reference")
        ours = np.concatenate(list(generate_batches(loaded, request, config, progress=False)))
        with torch.no_grad():
            theirs = pipe(
                list(prompts),
                negative_prompt=negative and [negative] * 2,
                num_images_per_prompt=2,
                num_inference_steps=config.steps,
                guidance_scale=3.0,
                latents=latents,
                output_type="np",
            ).images
        theirs = theirs.transpose(0, 3, 1, 2) * 2 - 1
        print(f"SDXL reference graph vs diffusers (negative {negative!r}): max abs {np.abs(ours - theirs).max():.2e}")
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1e-3


def test_pixart_bundles_carry_the_t5_encoder_and_match_diffusers(pixart_pipeline):
    from diffusers import DDIMScheduler, PixArtSigmaPipeline
    from transformers import T5Tokenizer

    loaded = load_bundle(pixart_pipeline / "bundle", strict=True)
    parts = loaded.manifest.text_to_image
    (encoder,) = parts.encoders
    assert (encoder.attention_mask, encoder.lowercase, encoder.pooled) == (True, True, False)
    assert (encoder.max_length, encoder.pad_id) == (300, 0)  # PixArt-Sigma's prompt length; T5 pads with <pad>
    assert parts.checks["text_encoder"]["precision"] == "fp32" and parts.fixed_conditions == {}
    reference = T5Tokenizer.from_pretrained(pixart_pipeline / "pipe" / "tokenizer")
    device = load_tokenizer(loaded.file(encoder.tokenizer), encoder.max_length, encoder.pad_id)
    for prompt in GOLDEN:
        expected = reference(prompt, padding="max_length", max_length=300, truncation=True)
        got = device.encode(prompt)
        assert got.ids == expected.input_ids and got.attention_mask == expected.attention_mask, prompt
    short = load_tokenizer(loaded.file(encoder.tokenizer), 8, encoder.pad_id)
    assert short.encode("a " * 40).ids[-1] == reference.eos_token_id  # truncation keeps T5's EOS
    config = bundle_sampler(loaded).overridden(guidance_scale=3.0)
    prompts = ("  A Red SEVEN on a blue background", TINY_PROMPTS[1])  # PixArt lowercases and strips its prompts
    pipe = PixArtSigmaPipeline.from_pretrained(pixart_pipeline / "pipe")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(per_sample_noise(seed_generators(range(3, 7)), loaded.manifest.sample_shape))
    for negative in (None, "a white zero on black"):
        request = GenerateRequest(prompts, negative, n=2, seed=3, graph="reference")
        ours = np.concatenate(list(generate_batches(loaded, request, config, progress=False)))
        with torch.no_grad():
            theirs = pipe(
                list(prompts),
                negative_prompt=negative or "",
                num_images_per_prompt=2,
                num_inference_steps=config.steps,
                guidance_scale=3.0,
                latents=latents,
                output_type="np",
                clean_caption=False,
                use_resolution_binning=False,
            ).images
        theirs = theirs.transpose(0, 3, 1, 2) * 2 - 1
        print(f"PixArt reference graph vs diffusers (negative {negative!r}): max abs {np.abs(ours - theirs).max():.2e}")
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1e-3
        assert np.abs(ours[0] - ours[2]).max() > 0.01  # the prompts matter: a test of the text path
    args = ["generate", "--bundle", pixart_pipeline / "bundle", "--prompt", prompts[0], "--seed", "3", "--no-progress"]
    full = run_cli("stepquant", *args, "--out", pixart_pipeline / "full.png")
    device = stepquant_without_export_side(*args, "--out", pixart_pipeline / "device.png")
    assert full.returncode == 0 == device.returncode, device.stderr
    assert np.array_equal(_pixels(pixart_pipeline / "full.png"), _pixels(pixart_pipeline / "device.png"))


def test_generate_refuses_what_it_cannot_run(text_bundle, demo_bundle, tmp_path):
    out = ["--out", tmp_path / "x.png", "--no-progress"]
    assert_one_line_error(
        run_cli("stepquant", "generate", "--bundle", demo_bundle[0], "--prompt", "a cat", *out),
        "has no tokenizer or text encoder (a denoiser-only bundle)",
    )
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_one_line_error(
        run_cli("stepquant", "generate", "--bundle", text_bundle, "--prompts-file", tmp_path / "empty.txt", *out),
        "holds no prompts",
    )
    assert_one_line_error(run_cli("stepquant", "generate", "--bundle", text_bundle, *out), "no prompt given")
    assert_one_line_error(
        run_cli("stepquant", "eval", "--bundle", text_bundle, "--n", "4", "--out", tmp_path / "eval"),
        "scores text-to-image bundles of demo-digits-sd",
    )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.png").write_bytes(b"x")
    assert_one_line_error(
        run_cli("stepquant", "generate", "--bundle", text_bundle, "--prompt", "a", "--out", tmp_path / "taken"),
        "is not an empty folder",
    )
    long = run_cli("stepquant", "generate", "--bundle", text_bundle, "--prompt", "a red seven " * 20, *out)
    assert long.returncode == 0 and [line for line in long.stderr.splitlines() if line.strip()] == [
        line for line in long.stderr.splitlines() if line.startswith("warning: 1 prompt(s) truncated")
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "taken", "x.png"]
    assert (tmp_path / "taken" / "mine.png").read_bytes() == b"x"


def test_forged_parts_are_refused(text_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(text_bundle, copy)
    data = (copy / "tokenizer" / "tokenizer.json").read_text()
    (copy / "tokenizer" / "tokenizer.json").write_text(
        data.replace('"seven', '"sevem', 1) if '"seven' in data else data + " "
    )
    with pytest.raises(BundleError, match="sha256 of tokenizer/tokenizer.json"):
        load_bundle(copy)
    shutil.rmtree(copy)
    shutil.copytree(text_bundle, copy)
    proto = onnx.load(str(copy / "vae_decoder" / "model.onnx"))
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    onnx.save(proto, str(copy / "vae_decoder" / "model.onnx"))
    forge_bundle(copy)
    assert_one_line_error(
        run_cli("stepquant", "generate", "--bundle", copy, "--prompt", "a", "--out", tmp_path / "x.png"),
        "not the denoiser's 4-channel latents",
    )


def test_a_pipeline_missing_a_part_is_refused_before_any_work(text_pipeline, tmp_path):
    broken = tmp_path / "sd"
    shutil.copytree(text_pipeline / "sd", broken)
    shutil.rmtree(broken / "text_encoder")
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(index))
    result = run_cli(
        "export-quantized",
        "--model",
        broken,
        "--conditioning",
        tmp_path / "none.safetensors",
        "--out",
        tmp_path / "b",
        *FAST,
    )
    assert_one_line_error(result, "has a tokenizer but no text_encoder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]


def test_pixart_alpha_gets_its_size_conditions_from_the_manifest(text_pipeline, tmp_path):
    """PixArt-alpha at 1024 px (transformer sample size 128) reads `resolution` and `aspect_ratio`; exported for
    32 px images only, the bundle's fixed conditions are that size's, and the reference graph matches diffusers'
    PixArtAlphaPipeline there."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    pipe = save_tiny_text_pipeline(
        tmp_path / "alpha", kind="pixart", num_layers=1, sample_size=128, num_attention_heads=3, cross_attention_dim=24
    )
    index = json.loads((pipe / "model_index.json").read_text())
    (pipe / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    size = ["--height-range", "16", "--width-range", "16"]
    prompts = ["--prompts-file", text_pipeline / "prompts.txt", "--guidance-scale", "3"]
    result = run_cli("export-quantized", "--model", pipe, *prompts, *size, "--out", tmp_path / "bundle", *FAST)
    assert result.returncode == 0, result.stderr
    loaded = load_bundle(tmp_path / "bundle")
    parts = loaded.manifest.text_to_image
    assert parts.fixed_conditions == {"resolution": (32.0, 32.0), "aspect_ratio": (1.0,)}
    assert parts.encoders[0].max_length == 120  # PixArt-alpha's prompt length
    config = bundle_sampler(loaded).overridden(guidance_scale=3.0)
    reference = PixArtAlphaPipeline.from_pretrained(pipe)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(per_sample_noise(seed_generators(range(3, 4)), loaded.manifest.sample_shape))
    with torch.no_grad():
        theirs = (
            reference(
                [TINY_PROMPTS[0]],
                negative_prompt="",
                num_inference_steps=config.steps,
                guidance_scale=3.0,
                latents=latents,
                height=32,
                width=32,
                output_type="np",
                clean_caption=False,
                use_resolution_binning=False,
            ).images.transpose(0, 3, 1, 2)
            * 2
            - 1
        )

    def difference(bundle) -> float:
        request = GenerateRequest((TINY_PROMPTS[0],), seed=3, graph="reference")
        return float(
            np.abs(np.concatenate(list(generate_batches(bundle, request, config, progress=False))) - theirs).max()
        )

    assert difference(loaded) <= 1e-3  # measured 8.3e-7
    native = dataclasses.replace(parts, fixed_conditions={"resolution": (1024.0, 1024.0), "aspect_ratio": (1.0,)})
    assert (
        difference(dataclasses.replace(loaded, manifest=dataclasses.replace(loaded.manifest, text_to_image=native)))
        > 1e-3
    )


def test_pixart_parts_of_another_kind_are_refused(pixart_pipeline, tmp_path):
    broken = tmp_path / "pipe"
    shutil.copytree(pixart_pipeline / "pipe", broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "CLIPTokenizer"]}))
    result = run_cli("export-quantized", "--model", broken, "--out", tmp_path / "b", *FAST)
    assert_one_line_error(result, "tokenizer is a CLIPTokenizer; this pipeline needs a T5Tokenizer there")
    assert not (tmp_path / "b").exists()
    copy = tmp_path / "bundle"
    shutil.copytree(pixart_pipeline / "bundle", copy)
    forge_bundle(copy, lambda m: m["text_to_image"]["encoders"][0].update(attention_mask=False))
    assert_one_line_error(
        run_cli("stepquant", "generate", "--bundle", copy, "--prompt", "a", "--out", tmp_path / "x.png"),
        "takes ['input_ids', 'attention_mask'], not input_ids",
    )


def test_a_pipeline_of_other_sizes_exports_and_generates_at_the_defaults(tmp_path):
    """Other channel counts, VAE layout and tokenizer vocabulary than the fixture's: only --prompts-file is given."""
    pipe = save_tiny_text_pipeline(
        tmp_path / "other",
        seed=3,
        max_length=24,
        merges=20,
        text={"hidden_size": 48},
        vae={
            "block_out_channels": (16, 16, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "scaling_factor": 0.3,
        },
        block_out_channels=(16, 32),
        norm_num_groups=8,
        attention_head_dim=4,
    )
    (tmp_path / "prompts.txt").write_text("a blue two\na yellow nine on red\n")
    exported = run_cli(
        "export-quantized",
        "--model",
        pipe,
        "--prompts-file",
        tmp_path / "prompts.txt",
        "--out",
        tmp_path / "bundle",
        "--eval-samples",
        "16",
        "--no-progress",
    )  # quality on fewer seeds: a test, not a benchmark
    assert exported.returncode == 0, exported.stderr
    result = stepquant_without_export_side(
        "generate",
        "--bundle",
        tmp_path / "bundle",
        "--prompt",
        "a blue two",
        "--out",
        tmp_path / "x.png",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert _pixels(tmp_path / "x.png").shape[:2] == (
        4 * 34,
        4 * 34,
    )  # 8x8 latents -> 32x32 images, a 1 px frame, upscaled 4x


def test_demo_digits_sd_is_a_small_diffusers_pipeline_whose_bundle_generates_without_torch(tmp_path):
    from diffusers import StableDiffusionPipeline

    from stepquant.models import load_model

    root = Path(load_model("demo-digits-sd").pipeline)
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) <= 15 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(root)  # diffusers' own loader, unchanged
    assert pipe.vae.config.latent_channels == 4 and pipe.unet.config.sample_size == 8 and pipe.vae_scale_factor == 4
    (tmp_path / "prompts.txt").write_text("a red seven on a blue background\nthe digit 3 in green, yellow paper\n")
    exported = run_cli(
        "export-quantized",
        "--model",
        "demo-digits-sd",
        "--prompts-file",
        tmp_path / "prompts.txt",
        "--out",
        tmp_path / "bundle",
        *FAST,
    )
    assert exported.returncode == 0, exported.stderr
    result = stepquant_without_export_side(
        "generate",
        "--bundle",
        tmp_path / "bundle",
        "--prompt",
        "a red seven on a blue background",
        "--n",
        "2",
        "--out",
        tmp_path / "images",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert [Image.open(p).size for p in sorted((tmp_path / "images").iterdir())] == [(32, 32), (32, 32)]
    scored = run_cli(
        "stepquant", "eval", "--bundle", tmp_path / "bundle", "--n", "20", "--no-progress", "--out", tmp_path / "eval"
    )
    assert scored.returncode == 0, scored.stderr
    scores = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert scores["prompts"] == 20 and scores["fp_colour_accuracy"] >= 0.9 and scores["psnr_to_fp_db"] > 20
    asked = ["stepquant", "eval", "--bundle", tmp_path / "bundle", "--n", "4", "--no-progress", "--out", tmp_path / "e"]
    guided = run_cli(*asked, "--sampler", "ddim:4", "--guidance-scale", "5")
    assert guided.returncode == 0, guided.stderr
    sampler = json.loads((tmp_path / "e" / "eval.json").read_text())["sampler"]
    assert (sampler["scheduler"], sampler["steps"], sampler["guidance_scale"]) == ("ddim", 4, 5.0)
    assert_one_line_error(run_cli(*asked, "--sampler", "euler:4"), "stores no 4 EULER steps sampler")


def test_fp16_bundles_carry_fp16_text_encoders_and_keep_an_upcast_vae_fp32(text_pipeline, tmp_path):
    from diffusers import AutoencoderKL

    assert AutoencoderKL.load_config(text_pipeline / "sd" / "vae")["force_upcast"]  # diffusers runs this VAE in FP32
    result = run_cli(
        "export-quantized",
        "--model",
        text_pipeline / "sd",
        "--prompts-file",
        text_pipeline / "prompts.txt",
        "--precision",
        "fp16",
        "--out",
        tmp_path / "bundle",
        *FAST,
    )
    assert result.returncode == 0, result.stderr
    parts = load_bundle(tmp_path / "bundle").manifest.text_to_image

    def float16(graph: str) -> bool:
        return any(
            t.data_type == onnx.TensorProto.FLOAT16
            for t in onnx.load(str(tmp_path / "bundle" / graph)).graph.initializer
        )

    assert float16(parts.encoders[0].graph) and not float16(parts.vae_decoder)
    assert parts.checks["text_encoder"]["precision"] == "fp16" and parts.checks["vae_decoder"]["precision"] == "fp32"
    assert parts.checks["text_encoder"]["worst_abs_error_relative_to_max"] <= 1e-2
    generated = run_cli(
        "stepquant",
        "generate",
        "--bundle",
        tmp_path / "bundle",
        "--prompt",
        "a red seven",
        "--out",
        tmp_path / "x.png",
        "--no-progress",
    )
    assert generated.returncode == 0, generated.stderr


def test_the_reference_graph_is_never_run_elsewhere_when_tensorrt_is_asked_for(text_bundle, tmp_path):
    result = run_cli(
        "stepquant",
        "generate",
        "--bundle",
        text_bundle,
        "--prompt",
        "a",
        "--graph",
        "reference",
        "--backend",
        "tensorrt",
        "--out",
        tmp_path / "x.png",
        "--no-progress",
    )
    assert_one_line_error(result, "the FP32 reference graph has no TensorRT engine")
    assert not (tmp_path / "x.png").exists()
