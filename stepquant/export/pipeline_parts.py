"""A text-to-image pipeline's other parts, carried in its bundle so that a prompt becomes an image with no
torch on the device: the tokenizer as `tokenizer/tokenizer.json` for the `tokenizers` library, the text
encoder and the VAE decoder as float ONNX graphs (Optimum's folder names: `text_encoder/model.onnx`,
`vae_decoder/model.onnx`), each checked end to end against its torch module before it is written down.

Carried for Stable Diffusion 1.x/2.x pipelines (one CLIP tokenizer and text encoder) and SDXL (two, the second
with its pooled projection; `tokenizer_2/`, `text_encoder_2/`), with an AutoencoderKL; other pipelines (PixArt's
T5) keep a denoiser-only bundle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stepquant.bundle.manifest import TextEncoderPart, TextToImage
from stepquant.errors import StepquantError
from stepquant.export.onnx_export import trace_to_onnx
from stepquant.export.shapes import ShapeProfile
from stepquant.runtime.onnxruntime_backend import OnnxRuntimeBackend

VAE_DECODER_GRAPH = "vae_decoder/model.onnx"
# worst absolute error of a part's graph against its torch module, relative to the output's largest magnitude
PART_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
SD_CONDITIONS = ("encoder_hidden_states",)
SDXL_CONDITIONS = ("encoder_hidden_states", "text_embeds", "time_ids")


class PipelinePartError(StepquantError, ValueError):
    """A pipeline part that cannot be carried: missing, of another kind, or not matching its torch module."""


@dataclass(frozen=True)
class _Encoder:
    """One tokenizer/text encoder pair of a pipeline, and what diffusers' encode_prompt takes from it."""

    suffix: str  # "" or "_2": the folders tokenizer{suffix}/, text_encoder{suffix}/
    penultimate: bool  # SDXL reads hidden_states[-2]; SD 1.x/2.x the last hidden state
    pooled: bool  # SDXL's second encoder also gives the pooled `text_embeds`


def _encoders(condition_names: tuple[str, ...]) -> tuple[_Encoder, ...] | None:
    if condition_names == SD_CONDITIONS:
        return (_Encoder("", False, False),)
    if condition_names == SDXL_CONDITIONS:
        return _Encoder("", True, False), _Encoder("_2", True, True)
    return None  # PixArt's T5 and others: a denoiser-only bundle


def carried_parts(pipeline: Path | None, condition_names: tuple[str, ...]) -> bool:
    """Whether the model is a Stable Diffusion (1.x/2.x or XL) pipeline whose tokenizers, text encoders and VAE
    the bundle carries. A pipeline without a VAE, or without any text part, exports its denoiser alone, as a
    bare model does; a tokenizer without its text encoder, or the reverse, is refused."""
    encoders = _encoders(condition_names)
    if pipeline is None or encoders is None:
        return False
    index = _model_index(pipeline)

    def present(part: str) -> bool:
        return (Path(pipeline) / part).is_dir() and bool((index.get(part) or [None])[0])

    parts = [name for e in encoders for name in (f"tokenizer{e.suffix}", f"text_encoder{e.suffix}")]
    have = [part for part in parts if present(part)]
    if have and len(have) < len(parts):
        missing = next(part for part in parts if part not in have)
        raise PipelinePartError(
            f"pipeline {pipeline} has a {have[0]} but no {missing}: a text-to-image bundle needs "
            f"{', '.join(parts)} (or export its unet/ folder alone, with --conditioning)"
        )
    return bool(have) and present("vae")


def _model_index(pipeline: Path) -> dict:
    try:
        return json.loads((Path(pipeline) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}


class _TextStates(nn.Module):
    """A CLIP text encoder's states as diffusers' encode_prompt takes them (no CLIP skip), and its pooled
    projection where the pipeline reads one."""

    def __init__(self, encoder: nn.Module, part: _Encoder) -> None:
        super().__init__()
        self.encoder, self.part = encoder, part

    def forward(self, input_ids: torch.Tensor):
        out = self.encoder(input_ids, output_hidden_states=self.part.penultimate)
        states = out.hidden_states[-2] if self.part.penultimate else out.last_hidden_state
        return (states, out.text_embeds) if self.part.pooled else states


class _Decode(nn.Module):
    """AutoencoderKL.decode on latents already divided by the scaling factor (the host scales, as Optimum does)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample).sample


def _write_graph(
    module: nn.Module,
    example: np.ndarray,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict,
    precision: str,
) -> dict:
    """Trace `module` to `path` (in FP16 with `precision` fp16, FP32 inputs and outputs kept), then check it."""
    from stepquant.export.precision import FP16_OPSET, convert_to_fp16

    trace_to_onnx(
        module,
        (torch.from_numpy(example),),
        path,
        inputs,
        outputs,
        dynamic,
        **({"opset": FP16_OPSET} if precision == "fp16" else {}),
    )
    if precision == "fp16":
        convert_to_fp16(path)
    return {
        **_check(module, path, path.parent.name, {inputs[0]: example}, PART_TOLERANCE[precision]),
        "precision": precision,
    }


def _check(module: nn.Module, graph: Path, name: str, inputs: dict[str, np.ndarray], tolerance: float) -> dict:
    """Run the graph on onnxruntime and the module in torch on the same inputs; refuse a graph that differs."""
    with torch.no_grad():
        expected = module(*(torch.from_numpy(v) for v in inputs.values()))
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    got = OnnxRuntimeBackend(graph, optimization_level="basic").run(inputs)
    error = max(float(np.abs(g - e).max() / max(float(np.abs(e).max()), 1e-12)) for g, e in zip(got, expected))
    if not all(np.isfinite(g).all() for g in got) or error > tolerance:
        raise PipelinePartError(
            f"the exported {name} graph differs from its torch module: worst error {error:.3g} of the "
            f"output's largest value (tolerance {tolerance:g})"
        )
    return {"worst_abs_error_relative_to_max": error, "tolerance": tolerance}


def export_tokenizer(pipeline: Path, staging: Path, prompts: list[str], folder: str = "tokenizer"):
    """Write FOLDER/tokenizer.json (no padding or truncation of its own: the runtime sets both from the manifest)
    and check that the `tokenizers` library gives transformers' ids for `prompts`."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    from stepquant.runtime.text_to_image import load_tokenizer

    try:
        reference = CLIPTokenizer.from_pretrained(str(Path(pipeline) / folder))
    except (OSError, ValueError, TypeError) as err:
        raise PipelinePartError(f"cannot load the tokenizer of {pipeline}/{folder}: {err}") from err
    tokenizer = Tokenizer.from_str(reference.backend_tokenizer.to_str())
    tokenizer.no_padding()
    tokenizer.no_truncation()
    (staging / folder).mkdir(parents=True)
    tokenizer.save(str(staging / folder / "tokenizer.json"))
    max_length, pad_id = int(reference.model_max_length), int(reference.pad_token_id)
    device = load_tokenizer(staging / folder / "tokenizer.json", max_length, pad_id)
    for prompt in [*prompts, ""]:
        ids = reference(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
        if device.encode(prompt).ids != ids:
            raise PipelinePartError(f"the tokenizers library encodes {prompt!r} unlike transformers' CLIPTokenizer")
    return reference, max_length, pad_id


def _text_encoder(
    pipeline: Path, staging: Path, part: _Encoder, prompts: list[str], precision: str
) -> tuple[TextEncoderPart, dict]:
    import transformers

    from stepquant.models.loading import require_safetensors

    folder = f"text_encoder{part.suffix}"
    reference, max_length, pad_id = export_tokenizer(pipeline, staging, prompts, f"tokenizer{part.suffix}")
    require_safetensors(pipeline / folder)
    cls = (_model_index(pipeline).get(folder) or [None, "CLIPTextModel"])[1]
    if (
        cls not in ("CLIPTextModel", "CLIPTextModelWithProjection")
        or (cls == "CLIPTextModelWithProjection") != part.pooled
    ):
        raise PipelinePartError(
            f"{pipeline}/{folder} is a {cls}; this pipeline needs "
            f"{'CLIPTextModelWithProjection' if part.pooled else 'CLIPTextModel'} there"
        )
    encoder = getattr(transformers, cls).from_pretrained(str(pipeline / folder), use_safetensors=True).eval()
    ids = np.asarray(
        reference(prompts[:2] or [""], padding="max_length", max_length=max_length, truncation=True).input_ids,
        dtype=np.int64,
    )
    graph = f"{folder}/model.onnx"
    (staging / folder).mkdir(parents=True)
    outputs = ["hidden_states", "text_embeds"] if part.pooled else ["hidden_states"]
    check = _write_graph(
        _TextStates(encoder, part),
        ids,
        staging / graph,
        ["input_ids"],
        outputs,
        {"input_ids": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
        precision,
    )
    return TextEncoderPart(f"tokenizer{part.suffix}/tokenizer.json", max_length, pad_id, graph, part.pooled), check


def export_pipeline_parts(
    pipeline: Path,
    staging: Path,
    sample_shape: tuple[int, int, int],
    prompts: list[str],
    condition_names: tuple[str, ...],
    precision: str = "fp32",
) -> TextToImage:
    """Write the tokenizers, text encoders and VAE decoder of `pipeline` into the bundle being staged, each
    checked against its torch module, and return the manifest's section for them. With `precision` fp16 the
    text encoders and the VAE decoder are FP16 graphs, except a VAE whose config says force_upcast: diffusers
    runs it in FP32, and so does the bundle."""
    from diffusers import AutoencoderKL

    from stepquant.models.loading import require_safetensors

    pipeline = Path(pipeline)
    encoders, checks = [], {}
    for part in _encoders(condition_names):
        entry, checks[f"text_encoder{part.suffix}"] = _text_encoder(pipeline, staging, part, prompts, precision)
        encoders.append(entry)
    require_safetensors(pipeline / "vae")
    vae = AutoencoderKL.from_pretrained(str(pipeline / "vae"), use_safetensors=True).eval()
    if vae.config.latent_channels != sample_shape[0]:
        raise PipelinePartError(
            f"the VAE of {pipeline} takes {vae.config.latent_channels}-channel latents, the denoiser "
            f"samples {sample_shape[0]}"
        )
    latents = np.random.default_rng(0).standard_normal((2, *sample_shape), dtype=np.float32)
    (staging / VAE_DECODER_GRAPH).parent.mkdir(parents=True)
    upcast = bool(getattr(vae.config, "force_upcast", False))
    checks["vae_decoder"] = _write_graph(
        _Decode(vae),
        latents,
        staging / VAE_DECODER_GRAPH,
        ["latent_sample"],
        ["sample"],
        {
            "latent_sample": {0: "batch", 2: "height", 3: "width"},
            "sample": {0: "batch", 2: "image_height", 3: "image_width"},
        },
        "fp32" if upcast else precision,
    )
    time_ids = None
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # diffusers' pipelines' vae_scale_factor
    if condition_names == SDXL_CONDITIONS:  # diffusers' default: original size = target size = the native size, no crop
        height, width = sample_shape[1] * scale, sample_shape[2] * scale
        time_ids = (float(height), float(width), 0.0, 0.0, float(height), float(width))
    return TextToImage(
        encoders=tuple(encoders),
        vae_decoder=VAE_DECODER_GRAPH,
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0),
        vae_scale_factor=scale,
        zero_negative=bool(_model_index(pipeline).get("force_zeros_for_empty_prompt", False)),
        time_ids=time_ids,
        checks=checks,
    )


def part_input_shapes(
    parts: TextToImage, profile: ShapeProfile, channels: int
) -> dict[str, dict[str, dict[str, tuple[int, ...]]]]:
    """Each text encoder's and the VAE decoder's TensorRT shape profile: token ids [images, max_length] and latents
    [images, channels, height, width] over the bundle's batch, height and width ranges (FP32 graphs: strongly
    typed engines run them in FP32, with TF32 where TensorRT allows it)."""
    bounds = ("min", "opt", "max")
    shapes = {
        e.graph: {"input_ids": {b: (getattr(profile.batch, b), e.max_length) for b in bounds}} for e in parts.encoders
    }
    shapes[parts.vae_decoder] = {
        "latent_sample": {
            b: (getattr(profile.batch, b), channels, getattr(profile.height, b), getattr(profile.width, b))
            for b in bounds
        }
    }
    return shapes
