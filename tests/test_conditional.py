"""Conditional denoisers: tiny random Stable Diffusion-style, SDXL-style (added conditions) and PixArt (DiT)
models built here, conditioned on precomputed random embeddings; export with dynamic batch, resolution and
sequence length, onnxruntime parity at several timesteps, two batch sizes and two resolutions, and guided
sampling from the bundle."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel
from diffusers.models.embeddings import PatchEmbed

from stepquant.bundle import load_bundle
from stepquant.calibrators.data import collect_calibration_set
from stepquant.eval import psnr
from stepquant.export.config import CalibrationConfig, ChecksConfig, ConditioningConfig
from stepquant.export.lint import lint
from stepquant.export.onnx_export import export_onnx
from stepquant.export.parity import check_parity, parity_feeds, replay_parity
from stepquant.export.shapes import DimRange, ShapeProfile, resize_inputs
from stepquant.models import EpsilonModel, load_model
from stepquant.models.demo_config import SCHEDULER_CONFIG
from stepquant.models.patch_embed import ShapeFollowingPatchEmbed, follow_input_shape_
from stepquant.models.schedulers import capture_table
from stepquant.models.tiny import TEXT_TOKENS, TINY_MODELS, random_conditioning, save_tiny_pipeline
from stepquant.models.torch_backend import TorchBackend
from stepquant.pipeline import ExportConfig, export_quantized
from stepquant.quant import QuantSpec, quantize_
from stepquant.runtime import SamplerConfig, sample
from stepquant.runtime.bundle_backends import quantized_backend
from stepquant.runtime.guidance import Conditioning, ConditioningError, guided_estimate

SEQUENCE = TEXT_TOKENS
ARCHITECTURES = TINY_MODELS
FEW_GUIDED_STEPS = SamplerConfig(steps=3, guidance_scale=3.0)
SHAPES = ShapeProfile(
    batch=DimRange(1, 4, 8), height=DimRange(8, 8, 16), width=DimRange(8, 8, 12), sequence=DimRange(4, 6, 8)
)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def exported(request, tmp_path_factory):
    """(kind, pipeline dir, conditioning file, bundle dir, report) for each architecture."""
    root = tmp_path_factory.mktemp(request.param)
    pipeline = save_tiny_pipeline(request.param, root / "pipeline")
    model = EpsilonModel(load_model(str(pipeline)).denoiser)
    conditioning_file = root / "conditioning.safetensors"
    random_conditioning(model).save(conditioning_file)
    out = root / "bundle"
    report = export_quantized(
        ExportConfig(
            model=str(pipeline),
            out=out,
            sampler=FEW_GUIDED_STEPS,
            shapes=SHAPES,
            progress=False,
            conditioning=ConditioningConfig(file=conditioning_file),
            calibration=CalibrationConfig(samples=2),
            checks=ChecksConfig(eval_samples=4, parity_batch=4),
        )
    )
    return request.param, pipeline, conditioning_file, out, report


def test_graph_takes_the_conditions_with_the_declared_dynamic_axes(exported):
    kind, _, _, out, _ = exported
    bundle = load_bundle(out)
    names = [c.name for c in bundle.manifest.conditions]
    expected = {
        "sd": ["encoder_hidden_states"],
        "sdxl": ["encoder_hidden_states", "text_embeds", "time_ids"],
        "pixart": ["encoder_hidden_states", "encoder_attention_mask"],
    }[kind]
    assert names == expected
    graph = onnx.load(str(bundle.file("model.onnx")), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert list(dims) == ["sample", "timestep", *expected]
    assert dims["sample"] == ["batch", 4, "height", "width"]
    assert dims["encoder_hidden_states"][:2] == ["batch", "sequence"]
    assert ShapeProfile.from_dict(bundle.manifest.shape_profile) == SHAPES
    shapes = bundle.manifest.engine["input_shapes"]
    assert shapes["sample"]["max"] == [8, 4, 16, 12] and shapes["encoder_hidden_states"]["min"][:2] == [1, 4]
    assert "encoder_hidden_states:8x8x" in bundle.file("build_engine.sh").read_text()


def test_parity_at_several_timesteps_two_batch_sizes_and_two_resolutions(exported):
    _, _, _, out, report = exported
    checked = report.end_to_end.timesteps
    assert report.parity_passed and report.fp_parity.passed
    assert report.primary.layerwise[0].feeds == len(checked)  # the gate saw every input, corners included
    assert len({t.timestep for t in checked}) >= 3
    shapes = {tuple(t.shape) for t in checked}
    assert (2, 4, 8, 8) in shapes and (4, 4, 16, 12) in shapes  # the declared ranges' corners
    assert {s[0] for s in shapes} >= {2, 4} and {s[2:] for s in shapes} >= {(8, 8), (16, 12)}
    replay = replay_parity(load_bundle(out))  # the saved feeds, corners included, replayed on onnxruntime
    assert replay.passed and {tuple(t.shape) for t in replay.timesteps} == shapes


def test_bundle_samples_with_guidance_on_onnxruntime(exported):
    _, pipeline, conditioning_file, out, report = exported
    bundle, conditioning = load_bundle(out), Conditioning.load(conditioning_file)
    assert bundle.manifest.sampler.guidance_scale == 3.0
    assert bundle.target("tensorrt").details["quality"]["space"] == "latent"
    fp = TorchBackend(EpsilonModel(load_model(str(pipeline)).denoiser))
    runs = {}
    for name, backend, scale in (
        ("fp", fp, 3.0),
        ("q", quantized_backend(bundle), 3.0),
        ("q1", quantized_backend(bundle), 1.0),
    ):
        config = SamplerConfig(steps=3, guidance_scale=scale)
        runs[name] = sample(
            backend,
            capture_table(config, bundle.manifest.noise_schedule),
            range(4),
            bundle.manifest.sample_shape,
            config,
            progress=False,
            conditioning=conditioning,
            clip=False,
        ).samples
    data_range = float(runs["fp"].max() - runs["fp"].min())
    guided = psnr(runs["q"], runs["fp"], data_range).mean()
    assert np.isfinite(runs["q"]).all() and guided > 20.0
    assert guided > psnr(runs["q1"], runs["fp"], data_range).mean() + 3.0  # guidance changes the samples
    assert report.psnr_mean_db > 20.0


@pytest.mark.slow
def test_calibration_keeps_unconditional_and_conditional_copies(tmp_path):
    model = EpsilonModel(UNet2DConditionModel(**ARCHITECTURES["sd"][2]).eval())
    conditioning = random_conditioning(model, prompts=2)
    calib = collect_calibration_set(
        TorchBackend(model),
        SCHEDULER_CONFIG,
        range(2),
        (4, 8, 8),
        FEW_GUIDED_STEPS,
        3,
        progress=False,
        conditioning=conditioning,
    )
    assert len(calib) == 3 * 2 * 2  # steps x (unconditional, conditional) x seeds
    states = calib.conditions["encoder_hidden_states"]
    assert np.array_equal(
        states[:2].numpy(), np.broadcast_to(conditioning.uncond["encoder_hidden_states"], states[:2].shape)
    )
    assert np.array_equal(states[2:4].numpy(), conditioning.cond["encoder_hidden_states"])
    assert torch.equal(calib.samples[:2], calib.samples[2:4])  # both copies see the same x_t


def test_guided_estimate_runs_both_halves_in_one_batch():
    calls = []

    def backend(x, t, **conditions):
        calls.append(len(x))
        return x + conditions["c"].reshape(-1, 1)

    conditioning = Conditioning({"c": np.array([[1.0], [2.0]])}, {"c": np.array([[0.0]])})
    x = np.zeros((3, 1), dtype=np.float32)
    eps = guided_estimate(backend, x, np.zeros(3), conditioning, [0, 1, 2], guidance_scale=4.0)
    assert calls == [6]
    assert np.allclose(eps.flatten(), [4.0, 8.0, 4.0])  # 0 + 4 (c - 0), prompts cycle
    assert np.allclose(guided_estimate(backend, x[:1], np.zeros(1), conditioning, [1], 1.0).flatten(), [2.0])


def test_patch_embed_follows_the_input_size_exactly():
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**ARCHITECTURES["pixart"][2]).eval()
    embed = model.pos_embed
    assert type(embed) is PatchEmbed
    for size in ((8, 8), (16, 12)):
        latent = torch.randn(2, 4, *size)
        with torch.no_grad():
            before = embed(latent)
            embed.__class__ = ShapeFollowingPatchEmbed
            after = embed(latent)
            embed.__class__ = PatchEmbed
        assert torch.equal(before, after)


def test_attention_projections_are_quantized_and_embeddings_excluded():
    torch.manual_seed(0)
    for kind in ("sdxl", "pixart"):
        cls, _, config = ARCHITECTURES[kind]
        names = quantize_(EpsilonModel(cls(**config).eval()), QuantSpec())
        assert any(n.endswith("attn1.to_q") for n in names) and any(n.endswith("attn2.to_k") for n in names)
        assert any(n.endswith("attn1.to_out.0") for n in names)
        excluded = (
            "time_embedding",
            "add_embedding",
            "conv_in",
            "conv_out",
            "proj_out",
            "pos_embed",
            "adaln_single",
            "caption_projection",
        )
        assert not [n for n in names if any(e in n for e in excluded)], kind


def test_conditioning_errors_are_clear(tmp_path, tiny_model_dir):
    pipeline = save_tiny_pipeline("sd", tmp_path / "sd")
    with pytest.raises(ConditioningError, match="pass --prompts-file"):
        export_quantized(
            ExportConfig(model=str(pipeline), out=tmp_path / "a", sampler=FEW_GUIDED_STEPS, progress=False)
        )
    wrong = Conditioning(
        {"encoder_hidden_states": torch.zeros(2, 5, 7)}, {"encoder_hidden_states": torch.zeros(1, 5, 7)}
    )
    wrong.save(tmp_path / "wrong.safetensors")
    with pytest.raises(ConditioningError, match="takes \\[prompts, sequence, 32\\]"):
        export_quantized(
            ExportConfig(
                model=str(pipeline),
                out=tmp_path / "b",
                sampler=FEW_GUIDED_STEPS,
                progress=False,
                conditioning=ConditioningConfig(file=tmp_path / "wrong.safetensors"),
            )
        )
    good = tmp_path / "good.safetensors"
    random_conditioning(EpsilonModel(load_model(str(pipeline)).denoiser)).save(good)
    with pytest.raises(ConditioningError, match="has no class table"):
        export_quantized(
            ExportConfig(
                model=str(pipeline),
                out=tmp_path / "c",
                sampler=FEW_GUIDED_STEPS,
                progress=False,
                conditioning=ConditioningConfig(classes=(1,)),
            )
        )
    with pytest.raises(ConditioningError, match="is unconditional"):
        export_quantized(
            ExportConfig(
                model=str(tiny_model_dir),
                out=tmp_path / "d",
                progress=False,
                conditioning=ConditioningConfig(file=good),
            )
        )
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConditioningError, match="cannot read conditioning"):
        Conditioning.load(tmp_path / "corrupt.safetensors")
    with pytest.raises(ConditioningError, match="NaN"):
        Conditioning({"c": torch.tensor([[float("nan")]])}, {"c": torch.zeros(1, 1)})
    for name in "abcd":
        assert not (tmp_path / name).exists()  # nothing half-written


def test_fp8_attention_puts_qdq_on_both_matmuls_and_keeps_parity(tmp_path):
    pipeline = save_tiny_pipeline(
        "sd", tmp_path / "sd", attention_head_dim=2
    )  # 2 heads (diffusers names SD's head count so): head_dim 16, 32
    conditioning = tmp_path / "conditioning.safetensors"
    random_conditioning(EpsilonModel(load_model(str(pipeline)).denoiser)).save(conditioning)
    report = export_quantized(
        ExportConfig(
            model=str(pipeline),
            out=tmp_path / "bundle",
            quant=QuantSpec(format="fp8", fp8_attention=True),
            sampler=FEW_GUIDED_STEPS,
            progress=False,
            conditioning=ConditioningConfig(file=conditioning),
            calibration=CalibrationConfig(samples=2),
            checks=ChecksConfig(eval_samples=2),
        )
    )
    assert report.parity_passed and any(n.endswith("attn2.processor") for n in report.quantized_layers)
    attention = [q for q in report.primary.layerwise[0].quantizers if q.name.endswith("softmax_quantizer")]
    assert attention and all(q.codes > 0 for q in attention)  # the FP8 attention quantizers are checked too
    graph = onnx.load(str(tmp_path / "bundle" / "model.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}

    def dequantized(name: str) -> bool:  # through the Transpose of K
        node = producers.get(name)
        while node is not None and node.op_type == "Transpose":
            node = producers.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    weights = {w.name for w in graph.initializer}

    def is_weight(name: str) -> bool:  # a DequantizeLinear of stored weights, possibly transposed
        node = producers.get(name)
        while node is not None and node.op_type == "Transpose":
            node = producers.get(node.input[0])
        return name in weights or (node is not None and node.op_type == "DequantizeLinear" and node.input[0] in weights)

    activation_matmuls = [n for n in graph.node if n.op_type == "MatMul" and not any(is_weight(i) for i in n.input)]
    processors = [n for n in report.quantized_layers if n.endswith(".processor")]
    assert len(processors) == 8 and len(activation_matmuls) == 2 * len(processors)  # Q·Kᵀ and P·V of each
    assert all(dequantized(i) for n in activation_matmuls for i in n.input)
    assert lint(tmp_path / "bundle" / "model.onnx") == []
    with pytest.raises(ValueError, match="FP8 only"):
        QuantSpec(fp8_attention=True)


def add_text_encoder(root: Path) -> None:
    """A tiny CLIP tokenizer (letters only) and text encoder in the pipeline directory, as diffusers lays them out."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokens = [
        "<|startoftext|>",
        "<|endoftext|>",
        *string.ascii_lowercase,
        *(c + "</w>" for c in string.ascii_lowercase),
    ]
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(
        str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt"), model_max_length=SEQUENCE
    ).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokens),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=SEQUENCE,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).save_pretrained(root / "text_encoder")
    index = json.loads((root / "model_index.json").read_text())
    index.update(
        tokenizer=["transformers", "CLIPTokenizer"],
        text_encoder=["transformers", "CLIPTextModel"],
        vae=[None, None],
        safety_checker=[None, None],
        feature_extractor=[None, None],
    )
    (root / "model_index.json").write_text(json.dumps(index))


def test_prompts_are_encoded_by_the_pipelines_text_encoder(tmp_path):
    pytest.importorskip("transformers")  # part of the test extra; `stepquant[text]` for users
    from transformers import CLIPTextModel, CLIPTokenizer

    pipeline = save_tiny_pipeline("sd", tmp_path / "sd")
    add_text_encoder(pipeline)
    (tmp_path / "prompts.txt").write_text("a cat\n\nthe dog\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stepquant",
            "encode-prompts",
            "--model",
            str(pipeline),
            "--prompts-file",
            str(tmp_path / "prompts.txt"),
            "--out",
            str(tmp_path / "c.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "conditioning of 2 prompts" in result.stdout
    conditioning = Conditioning.load(tmp_path / "c.safetensors")
    tokenizer = CLIPTokenizer.from_pretrained(pipeline / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(pipeline / "text_encoder").eval()
    with torch.no_grad():
        expected = [
            encoder(
                tokenizer(p, padding="max_length", max_length=SEQUENCE, truncation=True, return_tensors="pt").input_ids
            )[0]
            for p in ("a cat", "the dog", "")
        ]
    assert np.allclose(conditioning.cond["encoder_hidden_states"], torch.cat(expected[:2]).numpy(), atol=1e-6)
    assert np.allclose(conditioning.uncond["encoder_hidden_states"], expected[2].numpy(), atol=1e-6)
    report = export_quantized(
        ExportConfig(
            model=str(pipeline),
            out=tmp_path / "bundle",
            sampler=FEW_GUIDED_STEPS,
            progress=False,
            conditioning=ConditioningConfig(prompts_file=tmp_path / "prompts.txt"),
            calibration=CalibrationConfig(samples=2),
            checks=ChecksConfig(eval_samples=2),
        )
    )
    manifest = load_bundle(report.bundle).manifest
    assert manifest.info["conditioning"]["prompts"] == 2 and manifest.shape_profile["sequence"]["opt"] == SEQUENCE


def test_sample_command_takes_conditioning_and_guidance(exported, tmp_path):
    _, _, conditioning_file, out, _ = exported
    args = ["sample", "--bundle", str(out), "--n", "3", "--no-progress", "--out"]
    latents_file, images_file = str(tmp_path / "latents.npz"), str(tmp_path / "images.npz")
    assert_one_line_error(run_cli("stepquant", *args, latents_file), "pass --conditioning")
    result = run_cli(
        "stepquant", *args, latents_file, "--conditioning", str(conditioning_file), "--guidance-scale", "2"
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 3 latents" in result.stdout and "guidance 2" in result.stdout
    latents = np.load(tmp_path / "latents.npz")["samples"]
    assert latents.shape == (3, *load_bundle(out).manifest.sample_shape) and np.isfinite(latents).all()
    torch.manual_seed(0)  # a tiny VAE (one downsampling: latents of 8x8 decode to 16x16 RGB images)
    vae_root = tmp_path / "pipeline"
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(vae_root / "vae")
    result = run_cli(
        "stepquant", *args, images_file, "--conditioning", str(conditioning_file), "--decode-with", str(vae_root)
    )
    assert result.returncode == 0, result.stderr
    images = np.load(tmp_path / "images.npz")["samples"]
    assert "wrote 3 images" in result.stdout and images.shape == (3, 3, 16, 16) and np.abs(images).max() <= 1.0


def test_bench_times_conditional_graphs(exported):
    result = run_cli(
        "stepquant",
        "bench",
        "--bundle",
        str(exported[3]),
        "--batch",
        "2",
        "--backend",
        "onnxruntime",
        "--seconds",
        "0.2",
    )
    assert result.returncode == 0, result.stderr
    assert "tensorrt graph" in result.stdout and "x vs onnxruntime FP32" in result.stdout


def test_pixart_with_resolution_conditions_exports_dynamic(tmp_path):
    """PixArt at 1024 px takes resolution and aspect ratio as well (added_cond_kwargs)."""
    torch.manual_seed(0)
    config = {**ARCHITECTURES["pixart"][2], "num_attention_heads": 3, "cross_attention_dim": 24}  # width divisible by 3
    model = EpsilonModel(PixArtTransformer2DModel(**config, use_additional_conditions=True).eval())
    follow_input_shape_(model)  # what load_model does
    assert model.condition_names == ("encoder_hidden_states", "encoder_attention_mask", "resolution", "aspect_ratio")
    profile = SHAPES.resolved((4, 8, 8), SEQUENCE)
    export_onnx(model, tmp_path / "pixart.onnx", (4, 8, 8), profile=profile)
    conditions = {k: torch.from_numpy(v) for k, v in random_conditioning(model, prompts=3).cond.items()}
    conditions.update(resolution=torch.tensor([[64.0, 64.0]] * 3), aspect_ratio=torch.ones(3, 1))
    feeds = []
    for batch, height, width, sequence in ((2, 8, 8, 4), (3, 16, 12, 8)):
        samples, resized = resize_inputs(
            torch.randn(3, 4, 8, 8), conditions, model.conditions, batch, height, width, sequence
        )
        feeds += parity_feeds(samples, torch.full((batch,), 500.0), resized)
    report, _ = check_parity(model, tmp_path / "pixart.onnx", feeds, 1e-5)
    assert report.passed and [t.shape for t in report.timesteps] == [[2, 4, 8, 8], [3, 4, 16, 12]]


def test_cpu_target_refuses_a_transformer_with_nothing_to_run_in_integer():
    from stepquant.export.targets import TargetError, for_target

    torch.manual_seed(0)
    cls, _, config = ARCHITECTURES["pixart"]
    model = EpsilonModel(cls(**config).eval())
    quantize_(model, QuantSpec())
    with pytest.raises(TargetError, match="no quantized convolution"):
        for_target(model, "onnxruntime-cpu")


def test_shape_ranges_parse_validate_and_resolve():
    assert DimRange.parse("64") == DimRange(64, 64, 64) and DimRange.parse("32:64:96") == DimRange(32, 64, 96)
    for bad in ("a", "1:2", "8:4:16", "0"):
        with pytest.raises(ValueError):
            DimRange.parse(bad)
    smaller = ShapeProfile(height=DimRange(4, 8, 8), width=DimRange(8, 8, 8))  # leaves out the native 16 x 16
    assert smaller.working_shape((4, 16, 16), 4) == (4, 8, 8) and SHAPES.working_shape((4, 8, 8), 4) == (4, 8, 8)
    with pytest.raises(ValueError, match="holds 6, not a multiple of 4"):
        ShapeProfile(height=DimRange(6, 8, 8)).working_shape((4, 16, 16), 4)
    with pytest.raises(ValueError, match="does not contain the sample height 8"):
        ShapeProfile(height=DimRange(16, 16, 32)).resolved((4, 8, 8), None)
    with pytest.raises(ValueError, match="resolve the shape profile"):
        ShapeProfile().input_shapes(4, ())
    fixed = ShapeProfile().resolved((4, 8, 8), 6)
    assert (
        not fixed.dynamic_sizes and fixed.sequence == DimRange(6, 6, 6) and SHAPES.resolved((4, 8, 8), 6).dynamic_sizes
    )
    assert ShapeProfile.from_dict(SHAPES.to_dict()) == SHAPES
