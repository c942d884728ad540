"""A text-to-image pipeline's other parts, carried in its bundle so that a prompt becomes an image with no
torch on the device: the tokenizer as `tokenizer/tokenizer.json` for the `tokenizers` library, the text
encoder and the VAE decoder as float ONNX graphs (Optimum's folder names: `text_encoder/model.onnx`,
`vae_decoder/model.onnx`), each checked end to end against its torch module before it is written down.

Carried for Stable Diffusion 1.x/2.x pipelines (one CLIP tokenizer and text encoder), SDXL (two, the second
with its pooled projection; `tokenizer_2/`, `text_encoder_2/`) and PixArt (a T5 tokenizer and encoder, whose
attention mask the transformer also reads), with an AutoencoderKL. A T5 encoder stays FP32 with `--precision
fp16`: its FP16 graph would be converted from an FP32 trace, without the clamps transformers adds to T5's
feed-forward layers in FP16, whose activations overflow there."""

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
from stepquant.models.conditioning import fixed_conditions, vae_scale_factor
from stepquant.runtime.onnxruntime_backend import OnnxRuntimeBackend

VAE_DECODER_GRAPH = "vae_decoder/model.onnx"
# worst absolute error of a part's graph against its torch module, relative to the output's largest magnitude
PART_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
SD_CONDITIONS = ("encoder_hidden_states",)
SDXL_CONDITIONS = ("encoder_hidden_states", "text_embeds", "time_ids")
PIXART_CONDITIONS = ("encoder_hidden_states", "encoder_attention_mask")
PIXART_SIZE_CONDITIONS = (*PIXART_CONDITIONS, "resolution", "aspect_ratio")  # PixArt-alpha at 1024 px


class PipelinePartError(StepquantError, ValueError):
    """A pipeline part that cannot be carried: missing, of another kind, or not matching its torch module."""


@dataclass(frozen=True)
class EncoderSpec:
    """One tokenizer/text encoder pair of a pipeline, and what diffusers' encode_prompt takes from it."""

    suffix: str  # "" or "_2": the folders tokenizer{suffix}/, text_encoder{suffix}/
    penultimate: bool = False  # SDXL reads hidden_states[-2]; SD 1.x/2.x the last hidden state
    pooled: bool = False  # SDXL's second encoder also gives the pooled `text_embeds`
    t5: bool = False  # PixArt's T5: lowercased prompts, an attention mask into the encoder and the denoiser

    @property
    def tokenizer_classes(self) -> tuple[str, ...]:
        return ("T5Tokenizer", "T5TokenizerFast") if self.t5 else ("CLIPTokenizer", "CLIPTokenizerFast")

    @property
    def encoder_class(self) -> str:
        if self.t5:
            return "T5EncoderModel"
        return "CLIPTextModelWithProjection" if self.pooled else "CLIPTextModel"


def _encoders(condition_names: tuple[str, ...]) -> tuple[EncoderSpec, ...] | None:
    if condition_names == SD_CONDITIONS:
        return (EncoderSpec(""),)
    if condition_names == SDXL_CONDITIONS:
        return EncoderSpec("", penultimate=True), EncoderSpec("_2", penultimate=True, pooled=True)
    if condition_names in (PIXART_CONDITIONS, PIXART_SIZE_CONDITIONS):
        return (EncoderSpec("", t5=True),)
    return None  # other denoisers: a denoiser-only bundle


def carried_parts(pipeline: Path | None, condition_names: tuple[str, ...]) -> bool:
    """Whether the model is a Stable Diffusion (1.x/2.x or XL) or PixArt pipeline whose tokenizers, text
    encoders and VAE the bundle carries. A pipeline without a VAE, or without any text part, exports its
    denoiser alone, as a bare model does; a tokenizer without its text encoder, or the reverse, is refused."""
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
    for part in encoders if have else ():  # what the end of the export needs, known before any work
        _part_class(pipeline, f"tokenizer{part.suffix}", part.tokenizer_classes)
        _part_class(pipeline, f"text_encoder{part.suffix}", (part.encoder_class,))
        if part.t5:
            _sequence_length(pipeline)
    return bool(have) and present("vae")


def _part_class(pipeline: Path, folder: str, allowed: tuple[str, ...]) -> str:
    """The transformers class model_index.json names for `folder`, refused unless this pipeline can carry it."""
    cls = (_model_index(pipeline).get(folder) or [None, allowed[0]])[1]
    if cls not in allowed:
        raise PipelinePartError(f"{pipeline}/{folder} is a {cls}; this pipeline needs a {allowed[0]} there")
    return cls


def _model_index(pipeline: Path) -> dict:
    try:
        return json.loads((Path(pipeline) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}


def _sequence_length(pipeline: Path) -> int:
    """The token count a PixArt pipeline pads its prompts to: its encode_prompt's max_sequence_length default
    (300 for PixArt-Sigma, 120 for PixArt-alpha), which is also what the export's prompt encoding used."""
    import inspect

    import diffusers

    cls = getattr(diffusers, str(_model_index(pipeline).get("_class_name")), None)
    default = inspect.signature(cls.encode_prompt).parameters.get("max_sequence_length") if cls else None
    if default is None or not isinstance(default.default, int):
        raise PipelinePartError(
            f"pipeline {pipeline} names no diffusers pipeline class with a max_sequence_length in its "
            "model_index.json: the T5 prompt length is unknown"
        )
    return default.default


class _TextStates(nn.Module):
    """A text encoder's states as diffusers' encode_prompt takes them (CLIP: no CLIP skip, its pooled
    projection where the pipeline reads one; T5: the last states, under the prompt's attention mask)."""

    def __init__(self, encoder: nn.Module, part: EncoderSpec) -> None:
        super().__init__()
        self.encoder, self.part = encoder, part

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if self.part.t5:
            return self.encoder(input_ids, attention_mask=attention_mask).last_hidden_state
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
    module: nn.Module, examples: dict[str, np.ndarray], path: Path, outputs: list[str], dynamic: dict, precision: str
) -> dict:
    """Trace `module` on `examples` (its inputs, in order) to `path` (in FP16 with `precision` fp16, FP32 inputs
    and outputs kept), then check it."""
    from stepquant.export.precision import FP16_OPSET, convert_to_fp16

    trace_to_onnx(
        module,
        tuple(torch.from_numpy(v) for v in examples.values()),
        path,
        list(examples),
        outputs,
        dynamic,
        **({"opset": FP16_OPSET} if precision == "fp16" else {}),
    )
    if precision == "fp16":
        convert_to_fp16(path)
    return {**_check(module, path, path.parent.name, examples, PART_TOLERANCE[precision]), "precision": precision}


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


def export_tokenizer(pipeline: Path, staging: Path, prompts: list[str], part: EncoderSpec = EncoderSpec("")):
    """Write tokenizer{suffix}/tokenizer.json (no padding or truncation of its own: the runtime sets both from
    the manifest) and check that the `tokenizers` library gives transformers' ids (and attention masks) for
    `prompts`. The length is the tokenizer's own for CLIP, the pipeline's prompt length for T5."""
    import transformers
    from tokenizers import Tokenizer

    from stepquant.runtime.text_to_image import load_tokenizer

    folder = f"tokenizer{part.suffix}"
    cls = _part_class(pipeline, folder, part.tokenizer_classes)
    try:
        reference = getattr(transformers, cls).from_pretrained(str(Path(pipeline) / folder))
        tokenizer = Tokenizer.from_str(reference.backend_tokenizer.to_str())
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise PipelinePartError(f"cannot load the tokenizer of {pipeline}/{folder}: {err}") from err
    tokenizer.no_padding()
    tokenizer.no_truncation()
    (staging / folder).mkdir(parents=True)
    tokenizer.save(str(staging / folder / "tokenizer.json"))
    max_length = _sequence_length(pipeline) if part.t5 else int(reference.model_max_length)
    pad_id = int(reference.pad_token_id)
    device = load_tokenizer(staging / folder / "tokenizer.json", max_length, pad_id)
    for prompt in [*prompts, ""]:
        expected = reference(prompt, padding="max_length", max_length=max_length, truncation=True)
        got = device.encode(prompt)
        if got.ids != expected.input_ids or (part.t5 and got.attention_mask != expected.attention_mask):
            raise PipelinePartError(f"the tokenizers library encodes {prompt!r} unlike transformers' {cls}")
    return reference, max_length, pad_id


def _text_encoder(
    pipeline: Path, staging: Path, part: EncoderSpec, prompts: list[str], precision: str
) -> tuple[TextEncoderPart, dict]:
    import transformers

    from stepquant.models.loading import require_safetensors

    folder = f"text_encoder{part.suffix}"
    reference, max_length, pad_id = export_tokenizer(pipeline, staging, prompts, part)
    require_safetensors(pipeline / folder)
    cls = _part_class(pipeline, folder, (part.encoder_class,))
    encoder = getattr(transformers, cls).from_pretrained(str(pipeline / folder), use_safetensors=True).eval()
    tokens = reference(prompts[:2] or [""], padding="max_length", max_length=max_length, truncation=True)
    examples = {"input_ids": np.asarray(tokens.input_ids, dtype=np.int64)}
    if part.t5:
        examples["attention_mask"] = np.asarray(tokens.attention_mask, dtype=np.int64)
    graph = f"{folder}/model.onnx"
    (staging / folder).mkdir(parents=True)
    outputs = ["hidden_states", "text_embeds"] if part.pooled else ["hidden_states"]
    check = _write_graph(
        _TextStates(encoder, part),
        examples,
        staging / graph,
        outputs,
        {**{name: {0: "batch"} for name in examples}, **{name: {0: "batch"} for name in outputs}},
        "fp32" if part.t5 else precision,
    )
    entry = TextEncoderPart(
        f"tokenizer{part.suffix}/tokenizer.json",
        max_length,
        pad_id,
        graph,
        pooled=part.pooled,
        attention_mask=part.t5,
        lowercase=part.t5,
    )
    return entry, check


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
        {"latent_sample": latents},
        staging / VAE_DECODER_GRAPH,
        ["sample"],
        {
            "latent_sample": {0: "batch", 2: "height", 3: "width"},
            "sample": {0: "batch", 2: "image_height", 3: "image_width"},
        },
        "fp32" if upcast else precision,
    )
    scale = vae_scale_factor(pipeline)
    return TextToImage(
        encoders=tuple(encoders),
        vae_decoder=VAE_DECODER_GRAPH,
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0),
        vae_scale_factor=scale,
        zero_negative=bool(_model_index(pipeline).get("force_zeros_for_empty_prompt", False)),
        fixed_conditions=fixed_conditions(condition_names, sample_shape, scale),
        checks=checks,
    )


def part_input_shapes(
    parts: TextToImage, profile: ShapeProfile, channels: int
) -> dict[str, dict[str, dict[str, tuple[int, ...]]]]:
    """Each text encoder's and the VAE decoder's TensorRT shape profile: token ids (and T5's mask) [images,
    max_length] and latents [images, channels, height, width] over the bundle's batch, height and width ranges
    (FP32 graphs: strongly typed engines run them in FP32, with TF32 where TensorRT allows it)."""
    bounds = ("min", "opt", "max")
    shapes = {}
    for e in parts.encoders:
        tokens = {b: (getattr(profile.batch, b), e.max_length) for b in bounds}
        shapes[e.graph] = {"input_ids": tokens, **({"attention_mask": tokens} if e.attention_mask else {})}
    shapes[parts.vae_decoder] = {
        "latent_sample": {
            b: (getattr(profile.batch, b), channels, getattr(profile.height, b), getattr(profile.width, b))
            for b in bounds
        }
    }
    return shapes
