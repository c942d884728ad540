"""The denoiser architectures stepquant handles, and what each needs besides (sample, timestep).

An unconditional UNet takes nothing else. A Stable Diffusion-style `UNet2DConditionModel` takes the text
encoder's hidden states and, SDXL-style (`addition_embed_type="text_time"`), the pooled text embedding and
the size/crop `time_ids`. `PixArtTransformer2DModel` (a diffusion transformer) takes T5 hidden states, their
attention mask and, at 1024 px, resolution and aspect ratio. These extra inputs become named graph inputs
after `sample` and `timestep`, in the order listed here; their first axis is the batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

from stepquant.bundle.manifest import MAX_SAMPLE_ELEMENTS, SEQUENCE, ConditionInput

Call = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Architecture:
    """How to find a denoiser class in a pipeline, what it takes, and how to call it."""

    cls: type[nn.Module]
    subfolder: str  # its component folder in a diffusers pipeline
    conditions: Callable[[dict], tuple[ConditionInput, ...]]  # from the model's config
    call: Call  # returns the noise estimate only


def _unet_conditions(config: dict) -> tuple[ConditionInput, ...]:
    width = config["cross_attention_dim"]
    if not isinstance(width, int) or config.get("encoder_hid_dim") is not None:
        raise ValueError(
            "UNet2DConditionModel with per-block cross-attention widths or an encoder_hid_dim projection "
            "is not supported"
        )
    inputs = [ConditionInput("encoder_hidden_states", (SEQUENCE, width))]
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embedding + 6 size/crop ids
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs += [ConditionInput("text_embeds", (pooled,)), ConditionInput("time_ids", (6,))]
    elif config.get("addition_embed_type") is not None or config.get("class_embed_type") is not None:
        raise ValueError(
            f"UNet2DConditionModel with addition_embed_type={config.get('addition_embed_type')!r} / "
            f"class_embed_type={config.get('class_embed_type')!r} is not supported (text_time, SDXL's, is)"
        )
    return tuple(inputs)


def _call_unet_condition(model: nn.Module, sample, timestep, conditions):
    added = {k: conditions[k] for k in ("text_embeds", "time_ids") if k in conditions}
    return model(
        sample,
        timestep,
        encoder_hidden_states=conditions["encoder_hidden_states"],
        added_cond_kwargs=added or None,
        return_dict=False,
    )[0]


def _pixart_conditions(config: dict) -> tuple[ConditionInput, ...]:
    width = config.get("caption_channels") or config["cross_attention_dim"]
    inputs = [
        ConditionInput("encoder_hidden_states", (SEQUENCE, width)),
        ConditionInput("encoder_attention_mask", (SEQUENCE,)),
    ]
    additional = config.get("use_additional_conditions")
    if additional or (additional is None and config["sample_size"] == 128):  # diffusers' own default rule
        inputs += [ConditionInput("resolution", (2,)), ConditionInput("aspect_ratio", (1,))]
    return tuple(inputs)


def _call_pixart(model: nn.Module, sample, timestep, conditions):
    added = {k: conditions[k] for k in ("resolution", "aspect_ratio") if k in conditions}
    out = model(
        sample,
        encoder_hidden_states=conditions["encoder_hidden_states"],
        timestep=timestep,
        encoder_attention_mask=conditions["encoder_attention_mask"],
        added_cond_kwargs=added or {"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]
    return out[:, : sample.shape[1]]  # learned-sigma models also predict the variance: keep the noise half


ARCHITECTURES: dict[str, Architecture] = {
    "UNet2DModel": Architecture(
        UNet2DModel,
        "unet",
        lambda config: (),
        lambda model, sample, timestep, _: model(sample, timestep, return_dict=False)[0],
    ),
    "UNet2DConditionModel": Architecture(UNet2DConditionModel, "unet", _unet_conditions, _call_unet_condition),
    "PixArtTransformer2DModel": Architecture(PixArtTransformer2DModel, "transformer", _pixart_conditions, _call_pixart),
}


def architecture_of(model: nn.Module) -> Architecture:
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(f"{name} is not a supported denoiser; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def config_file(model: nn.Module) -> tuple[str, str]:
    """(bundle path, text) of the denoiser's diffusers config, as its pipeline folder holds it
    (`unet/config.json`, `transformer/config.json`), less the exporting machine's path to it."""
    config = json.loads(model.to_json_string())
    config.pop("_name_or_path", None)
    return f"{architecture_of(model).subfolder}/config.json", json.dumps(config, indent=2, sort_keys=True) + "\n"


def sample_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the model's native sample (latent for latent models), refused above
    MAX_SAMPLE_ELEMENTS values before anything of that size is allocated."""
    size = model.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    shape = (model.config.in_channels, height, width)
    if not all(isinstance(d, int) and d >= 1 for d in shape) or shape[0] * shape[1] * shape[2] > MAX_SAMPLE_ELEMENTS:
        raise ValueError(
            f"the model's sample shape {list(shape)} (in_channels, sample_size) is not {MAX_SAMPLE_ELEMENTS:,} "
            "values or fewer: check its config.json"
        )
    return shape


def spatial_factor(model: nn.Module) -> int:
    """What every sample height and width must be a multiple of: a transformer's patch size, or 2 per
    downsampling level of a UNet (every down block but the last halves the size)."""
    config = model.config
    if getattr(config, "patch_size", None):
        return int(config.patch_size)
    return 2 ** (len(getattr(config, "block_out_channels", (0,))) - 1)
