"""A text-to-image pipeline's other parts, carried in its bundle so that a prompt becomes an image with no
torch on the device: the tokenizer as `tokenizer/tokenizer.json` for the `tokenizers` library, the text
encoder and the VAE decoder as float ONNX graphs (Optimum's folder names: `text_encoder/model.onnx`,
`vae_decoder/model.onnx`), each checked end to end against its torch module before it is written down.

Carried for Stable Diffusion 1.x/2.x-style pipelines (one CLIP tokenizer and text encoder, an AutoencoderKL,
a denoiser taking `encoder_hidden_states`); other pipelines keep a denoiser-only bundle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stepquant.bundle.manifest import TextToImage
from stepquant.errors import StepquantError
from stepquant.export.onnx_export import trace_to_onnx
from stepquant.runtime.onnxruntime_backend import OnnxRuntimeBackend

TOKENIZER_FILE = "tokenizer/tokenizer.json"
TEXT_ENCODER_GRAPH = "text_encoder/model.onnx"
VAE_DECODER_GRAPH = "vae_decoder/model.onnx"
PART_TOLERANCE = 1e-4  # worst absolute error of a float graph, relative to its output's largest magnitude
PARTS = ("tokenizer", "text_encoder", "vae")


class PipelinePartError(StepquantError, ValueError):
    """A pipeline part that cannot be carried: missing, of another kind, or not matching its torch module."""


def carried_parts(pipeline: Path | None, condition_names: tuple[str, ...]) -> bool:
    """Whether the model is a pipeline whose tokenizer, text encoder and VAE the bundle carries (a pipeline
    without a VAE, or without any text part, exports its denoiser alone, as a bare model does); a tokenizer
    without its text encoder, or the reverse, is refused."""
    if pipeline is None or condition_names != ("encoder_hidden_states",):
        return False
    index = _model_index(pipeline)
    present = [part for part in PARTS if (Path(pipeline) / part).is_dir() and (index.get(part) or [None])[0]]
    text = [part for part in PARTS[:2] if part in present]
    if len(text) == 1:
        missing = next(part for part in PARTS[:2] if part not in present)
        raise PipelinePartError(f"pipeline {pipeline} has a {text[0]} but no {missing}: a text-to-image bundle needs both "
                                "(or export its unet/ folder alone, with --conditioning)")
    return len(present) == len(PARTS)


def _model_index(pipeline: Path) -> dict:
    try:
        return json.loads((Path(pipeline) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}


class _LastHiddenState(nn.Module):
    """CLIPTextModel's first output, what diffusers' encode_prompt takes (no CLIP skip)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids)[0]


class _Decode(nn.Module):
    """AutoencoderKL.decode on latents already divided by the scaling factor (the host scales, as Optimum does)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample).sample


@dataclass
class _Check:
    graph: str
    worst_relative_error: float

    def to_dict(self) -> dict:
        return {"graph": self.graph, "worst_abs_error_relative_to_max": self.worst_relative_error, "tolerance": PART_TOLERANCE}


def _check(module: nn.Module, graph: Path, name: str, inputs: dict[str, np.ndarray]) -> _Check:
    """Run the graph on onnxruntime and the module in torch on the same inputs; refuse a graph that differs."""
    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in inputs.values())).numpy()
    got = OnnxRuntimeBackend(graph, optimization_level="basic").run(inputs)[0]
    error = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-12))
    if not np.isfinite(got).all() or error > PART_TOLERANCE:
        raise PipelinePartError(f"the exported {name} graph differs from its torch module: worst error {error:.3g} of the "
                                f"output's largest value (tolerance {PART_TOLERANCE:g})")
    return _Check(name, error)


def _tokenizer(pipeline: Path, staging: Path, prompts: list[str]):
    """Write tokenizer.json (no padding or truncation of its own: the runtime sets both from the manifest) and
    check that the `tokenizers` library gives transformers' ids for `prompts`."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    try:
        reference = CLIPTokenizer.from_pretrained(str(Path(pipeline) / "tokenizer"))
    except (OSError, ValueError, TypeError) as err:
        raise PipelinePartError(f"cannot load the tokenizer of {pipeline}: {err}") from err
    tokenizer = Tokenizer.from_str(reference.backend_tokenizer.to_str())
    tokenizer.no_padding()
    tokenizer.no_truncation()
    (staging / TOKENIZER_FILE).parent.mkdir(parents=True)
    tokenizer.save(str(staging / TOKENIZER_FILE))
    max_length, pad_id = int(reference.model_max_length), int(reference.pad_token_id)
    from stepquant.runtime.text_to_image import load_tokenizer

    device = load_tokenizer(staging / TOKENIZER_FILE, max_length, pad_id)
    for prompt in [*prompts, ""]:
        ids = reference(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
        if device.encode(prompt).ids != ids:
            raise PipelinePartError(f"the tokenizers library encodes {prompt!r} unlike transformers' CLIPTokenizer")
    return reference, max_length, pad_id


def export_pipeline_parts(pipeline: Path, staging: Path, sample_shape: tuple[int, int, int], prompts: list[str]) -> TextToImage:
    """Write the tokenizer, text encoder and VAE decoder of `pipeline` into the bundle being staged, each
    checked against its torch module, and return the manifest's section for them."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from stepquant.models.loading import require_safetensors

    pipeline = Path(pipeline)
    reference, max_length, pad_id = _tokenizer(pipeline, staging, prompts)
    for part in ("text_encoder", "vae"):
        require_safetensors(pipeline / part)
    encoder = CLIPTextModel.from_pretrained(str(pipeline / "text_encoder"), use_safetensors=True).eval()
    vae = AutoencoderKL.from_pretrained(str(pipeline / "vae"), use_safetensors=True).eval()
    if vae.config.latent_channels != sample_shape[0]:
        raise PipelinePartError(f"the VAE of {pipeline} takes {vae.config.latent_channels}-channel latents, the denoiser "
                                f"samples {sample_shape[0]}")
    ids = np.asarray(reference(prompts[:2] or [""], padding="max_length", max_length=max_length, truncation=True).input_ids,
                     dtype=np.int64)
    (staging / TEXT_ENCODER_GRAPH).parent.mkdir(parents=True)
    text = _LastHiddenState(encoder)
    trace_to_onnx(text, (torch.from_numpy(ids),), staging / TEXT_ENCODER_GRAPH, ["input_ids"], ["last_hidden_state"],
                  {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}})
    text_check = _check(text, staging / TEXT_ENCODER_GRAPH, "text encoder", {"input_ids": ids})
    latents = np.random.default_rng(0).standard_normal((2, *sample_shape), dtype=np.float32)
    (staging / VAE_DECODER_GRAPH).parent.mkdir(parents=True)
    decode = _Decode(vae)
    trace_to_onnx(decode, (torch.from_numpy(latents),), staging / VAE_DECODER_GRAPH, ["latent_sample"], ["sample"],
                  {"latent_sample": {0: "batch", 2: "height", 3: "width"}, "sample": {0: "batch", 2: "image_height",
                                                                                     3: "image_width"}})
    vae_check = _check(decode, staging / VAE_DECODER_GRAPH, "VAE decoder", {"latent_sample": latents})
    return TextToImage(tokenizer=TOKENIZER_FILE, max_length=max_length, pad_id=pad_id, text_encoder=TEXT_ENCODER_GRAPH,
                       vae_decoder=VAE_DECODER_GRAPH, scaling_factor=float(vae.config.scaling_factor),
                       shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0),
                       checks={"text_encoder": text_check.to_dict(), "vae_decoder": vae_check.to_dict()})
