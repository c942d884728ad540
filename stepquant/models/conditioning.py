"""Where a conditional model's conditioning comes from: a conditioning file, a class-conditional pipeline's
class table (`--classes`; its null row is the unconditional input), or prompts encoded with the pipeline's
own text encoder(s) through its `encode_prompt` (so CLIP skip, SDXL's two encoders and PixArt's T5 attention
mask are exactly what diffusers does; needs `transformers`: `pip install 'stepquant[text]'`). The
unconditional rows of prompts are the empty prompt's."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from stepquant.models.denoisers import ConditionInput
from stepquant.models.epsilon import EpsilonModel
from stepquant.models.loading import LoadedModel
from stepquant.runtime.guidance import Conditioning, ConditioningError, choose_conditioning, read_prompts

VAE_SCALE = 8  # latent pixel -> image pixels for SD 1.x/2.x/XL and PixArt's VAEs (diffusers' default)


def vae_scale_factor(pipeline_dir: Path) -> int:
    """Image pixels per latent pixel, as diffusers' pipelines compute it from their VAE's config."""
    import json

    try:
        blocks = json.loads((Path(pipeline_dir) / "vae" / "config.json").read_text())["block_out_channels"]
    except (OSError, ValueError, KeyError, TypeError):
        return VAE_SCALE
    return 2 ** (len(blocks) - 1)


def fixed_conditions(names: Sequence[str], sample_shape: tuple[int, int, int], scale: int) -> dict[str, tuple]:
    """The denoiser inputs a pipeline gives every image alike at the sample's size, in image pixels: SDXL's
    size/crop `time_ids` (diffusers' default: original = target = this size, no crop), PixArt-alpha's
    `resolution` and `aspect_ratio`."""
    height, width = float(sample_shape[1] * scale), float(sample_shape[2] * scale)
    fixed = {}
    if "time_ids" in names:
        fixed["time_ids"] = (height, width, 0.0, 0.0, height, width)
    if "resolution" in names:
        fixed.update(resolution=(height, width), aspect_ratio=(height / width,))
    return fixed


def _load_text_pipeline(pipeline_dir: Path):
    try:
        import transformers  # noqa: F401  (diffusers loads the text encoders with it)
    except ImportError as err:
        raise ConditioningError("encoding prompts needs transformers: pip install 'stepquant[text]'") from err
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging

    skip = ("unet", "transformer", "vae", "scheduler", "safety_checker", "feature_extractor", "image_encoder")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the safety-checker and scheduler-config notices are not ours to print
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index = DiffusionPipeline.load_config(str(pipeline_dir))
            # safetensors only: a text encoder's pickle weights could run code on loading
            return DiffusionPipeline.from_pretrained(
                str(pipeline_dir), use_safetensors=True, **{k: None for k in skip if k in index}
            )
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConditioningError(f"cannot load the text encoder(s) of {pipeline_dir}: {err}") from err
    finally:
        logging.set_verbosity(verbosity)


@torch.no_grad()
def encode_prompts(
    pipeline_dir: Path, prompts: list[str], conditions: tuple[ConditionInput, ...], sample_shape: tuple[int, int, int]
) -> Conditioning:
    """The conditioning rows of `prompts` (and of the empty prompt) for a model taking `conditions`."""
    pipe = _load_text_pipeline(pipeline_dir)
    names = {c.name for c in conditions}
    fixed = {
        k: torch.tensor([v], dtype=torch.float32)
        for k, v in fixed_conditions(names, sample_shape, vae_scale_factor(pipeline_dir)).items()
    }
    rows = {k: v.repeat(len(prompts), 1) for k, v in fixed.items()}
    if "text_embeds" in names:  # SDXL: two encoders, pooled embedding and size/crop ids
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            prompts, device="cpu", do_classifier_free_guidance=True, negative_prompt=[""] * len(prompts)
        )
        return Conditioning(
            {"encoder_hidden_states": cond, "text_embeds": pooled, **rows},
            {"encoder_hidden_states": uncond[:1], "text_embeds": pooled_uncond[:1], **fixed},
        )
    if "encoder_attention_mask" in names:  # PixArt: T5 states with their padding mask
        cond, mask, uncond, uncond_mask = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt="", device="cpu"
        )
        return Conditioning(
            {"encoder_hidden_states": cond, "encoder_attention_mask": mask.float(), **rows},
            {"encoder_hidden_states": uncond[:1], "encoder_attention_mask": uncond_mask[:1].float(), **fixed},
        )
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * len(prompts))
    return Conditioning({"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond[:1]})


def load_conditioning(
    model: EpsilonModel,
    loaded: LoadedModel,
    prompts_file: Path | None,
    conditioning_file: Path | None,
    sample_shape: tuple[int, int, int],
    classes: Sequence[int] | None = None,
) -> Conditioning | None:
    """The conditioning of a file, of prompts or of classes (None for an unconditional model), in the model's
    input order, for export, sample and encode-prompts alike (stepquant.runtime.guidance.choose_conditioning)."""

    def prompts() -> Conditioning:
        if loaded.pipeline is None:
            raise ConditioningError(
                "--prompts-file needs --model to be a pipeline directory (its text encoder "
                "encodes the prompts); or pass --conditioning"
            )
        return encode_prompts(loaded.pipeline, read_prompts(prompts_file), model.conditions, sample_shape)

    return choose_conditioning(
        model.conditions,
        f"{loaded.source} ({type(loaded.denoiser).__name__})",
        conditioning_file,
        classes,
        loaded.class_table,
        prompts if prompts_file is not None else None,
        missing="pass --prompts-file (encoded by the pipeline's text encoder) or --conditioning",
    )
