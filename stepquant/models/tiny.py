"""Tiny random-weight conditional denoisers (Stable Diffusion-, SDXL- and PixArt-style) saved as diffusers
pipeline directories, and random conditioning for them: what the tests and tools/bench_conditional.py run
on, since no checkpoint can be downloaded here. Their quality figures say nothing about real models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, PixArtTransformer2DModel, UNet2DConditionModel

from stepquant.models.demo_config import SCHEDULER_CONFIG
from stepquant.models.epsilon import EpsilonModel
from stepquant.models.loading import CLASS_TABLE_FILE
from stepquant.runtime.guidance import Conditioning

TEXT_TOKENS = 6
_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
# name -> (class, pipeline folder, config)
TINY_MODELS: dict[str, tuple[type, str, dict]] = {
    "sd": (
        UNet2DConditionModel,
        "unet",
        dict(
            _UNET,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
    ),
    "sdxl": (
        UNet2DConditionModel,
        "unet",
        dict(
            _UNET,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
        ),
    ),
    "pixart": (
        PixArtTransformer2DModel,
        "transformer",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            cross_attention_dim=16,
            caption_channels=12,
            norm_num_groups=8,
        ),
    ),
}


def save_tiny_pipeline(kind: str, root: Path, seed: int = 0, classes: int | None = None, **overrides) -> Path:
    """A diffusers pipeline directory holding the tiny denoiser `kind` (config `overrides` applied) and a
    DDIM scheduler; with `classes`, a random class table of that many classes (a class-conditional pipeline,
    like demo-digits-cond)."""
    cls, folder, config = TINY_MODELS[kind]
    torch.manual_seed(seed)
    model = cls(**{**config, **overrides})
    model.save_pretrained(root / folder)
    if classes is not None:
        (root / CLASS_TABLE_FILE).parent.mkdir(parents=True, exist_ok=True)
        random_conditioning(EpsilonModel(model), classes, seed).save(root / CLASS_TABLE_FILE)
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                folder: ["diffusers", cls.__name__],
                "scheduler": ["diffusers", "DDIMScheduler"],
            }
        )
    )
    return root


TINY_PROMPTS = ("a red seven on a blue background", "the digit 3 in green, yellow paper", "a white zero on black")
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
_TEXT_ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
_T5_ENCODER = dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8)
_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    scaling_factor=0.5,
)


def save_tiny_text_pipeline(
    root: Path,
    seed: int = 0,
    kind: str = "sd",
    max_length: int = 16,
    merges: int = 60,
    text: dict | None = None,
    vae: dict | None = None,
    **denoiser,
) -> Path:
    """A random-weight text-to-image pipeline directory that diffusers loads as it is: `kind` "sd"
    (StableDiffusionPipeline: the tiny "sd" UNet, one CLIP tokenizer and text encoder), "sdxl"
    (StableDiffusionXLPipeline: the tiny "sdxl" UNet, two tokenizers, the second padding with "!" as SDXL's
    does, and two encoders, the second with its pooled projection) or "pixart" (PixArtSigmaPipeline: the tiny
    "pixart" transformer, a T5 tokenizer and encoder). Tokenizers are learned from TINY_PROMPTS; `text`
    overrides the encoders' config, `vae` the AutoencoderKL's (one downsampling), `denoiser` the denoiser's."""
    from diffusers import AutoencoderKL

    root = Path(root)
    if kind == "pixart":
        index = _save_t5_parts(root, seed, {**_T5_ENCODER, **(text or {})}, denoiser)
    else:
        index = _save_clip_parts(root, seed, kind, max_length, merges, text, denoiser)
    AutoencoderKL(**{**_VAE, **(vae or {})}).save_pretrained(root / "vae")
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(root / "scheduler")  # Stable Diffusion's, kept as is
    index.update(vae=["diffusers", "AutoencoderKL"])
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def _save_clip_parts(
    root: Path, seed: int, kind: str, max_length: int, merges: int, text: dict | None, unet: dict
) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from stepquant.models.clip_tokenizer import save_clip_tokenizer

    xl = kind == "sdxl"
    text = {**_TEXT_ENCODER, **({"hidden_size": 16, "num_attention_heads": 2} if xl else {}), **(text or {})}
    save_tiny_pipeline(kind, root, seed, **{"cross_attention_dim": text["hidden_size"] * (2 if xl else 1), **unet})
    torch.manual_seed(seed)
    index = json.loads((root / "model_index.json").read_text())
    for suffix, cls in (("", CLIPTextModel), *((("_2", CLIPTextModelWithProjection),) if xl else ())):
        tokenizer = save_clip_tokenizer(root / f"tokenizer{suffix}", TINY_PROMPTS, merges, max_length)
        if suffix:
            CLIPTokenizer.from_pretrained(tokenizer, pad_token="!").save_pretrained(tokenizer)
        vocab = len(json.loads((tokenizer / "vocab.json").read_text()))
        config = CLIPTextConfig(
            vocab_size=vocab,
            max_position_embeddings=max_length,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
            **({"projection_dim": 16} if suffix else {}),
            **text,
        )
        cls(config).save_pretrained(root / f"text_encoder{suffix}")
        index.update(
            {
                f"tokenizer{suffix}": ["transformers", "CLIPTokenizer"],
                f"text_encoder{suffix}": ["transformers", cls.__name__],
            }
        )
    index.update(feature_extractor=[None, None], image_encoder=[None, None])
    if xl:
        index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    return index


def _save_t5_parts(root: Path, seed: int, text: dict, transformer: dict) -> dict:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from stepquant.models.t5_tokenizer import save_t5_tokenizer

    save_tiny_pipeline("pixart", root, seed, **{"caption_channels": text["d_model"], **transformer})
    torch.manual_seed(seed)
    tokenizer = T5Tokenizer.from_pretrained(save_t5_tokenizer(root / "tokenizer", TINY_PROMPTS))
    config = T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **text)
    T5EncoderModel(config).save_pretrained(root / "text_encoder")
    return {
        "_class_name": "PixArtSigmaPipeline",
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "text_encoder": ["transformers", "T5EncoderModel"],
    }


def random_conditioning(
    model: EpsilonModel, prompts: int = 3, seed: int = 0, tokens: int = TEXT_TOKENS
) -> Conditioning:
    """Random embeddings of the model's condition inputs, in place of a text encoder's: N(0, 1) states,
    an attention mask with its last token padded, SDXL size ids of a 64 px image."""
    generator = torch.Generator().manual_seed(seed)
    rows: dict[str, dict[str, torch.Tensor]] = {"cond": {}, "uncond": {}}
    for kind, count in (("cond", prompts), ("uncond", 1)):
        for condition in model.conditions:
            shape = condition.concrete_shape(count, tokens)
            if condition.name == "encoder_attention_mask":
                tensor = torch.ones(shape)
                tensor[:, -1] = 0.0
            elif condition.name == "time_ids":
                tensor = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(count, 1)
            else:
                tensor = torch.randn(shape, generator=generator)
            rows[kind][condition.name] = tensor
    return Conditioning(rows["cond"], rows["uncond"])
