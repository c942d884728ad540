"""A prompt to an image from a whole-pipeline bundle, on numpy and an engine alone (no torch, no transformers).

The stages are diffusers' StableDiffusion(XL)Pipeline's and PixArtSigmaPipeline's, ported: the `tokenizers`
library pads to the model's length with its own pad id and truncates keeping BOS and EOS (as CLIPTokenizer
does; T5 keeps its EOS); the text encoder graphs give the prompts' states (and SDXL's pooled embedding; its
size ids come from the manifest; T5 takes, and the transformer reads, the tokens' attention mask) and the
negative prompt's for guidance (`text_conditioning`); PixArt's prompts are lowercased and stripped, as its
pipelines do without caption cleaning (`clean_caption=False`, or without bs4 and ftfy); the denoising loop is
`sample_batches` (image i starts from seed + i's per-sample draw, so a seed gives the same picture on every
install and backend); the VAE decoder graph turns latents / scaling_factor + shift_factor into images.
Images come back in [-1, 1]; `to_uint8` rounds them as diffusers' image processor does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stepquant.bundle import Bundle, BundleError, load_bundle
from stepquant.runtime.backend import Backend
from stepquant.runtime.bundle_backends import (
    RunOptions,
    bundle_corrections,
    bundle_sampler,
    bundle_table,
    part_backend,
    quantized_backend,
    reference_backend,
)
from stepquant.runtime.guidance import Conditioning
from stepquant.runtime.onnxruntime_backend import OnnxRuntimeBackend
from stepquant.runtime.sampler import SamplerConfig, sample_batches

GRAPHS = ("quantized", "reference")  # what denoises: the deployed Q/DQ graph, or the FP32 reference graph


def print_warning(message: str) -> None:
    """The default `warn`: one `warning:` line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def load_tokenizer(path: Path, max_length: int, pad_id: int):
    """A `tokenizers` Tokenizer padding and truncating to `max_length` as CLIPTokenizer(padding="max_length",
    truncation=True) does (its post-processor adds BOS and EOS inside the length)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the library's own error type is not exported
        raise BundleError(f"cannot read the tokenizer {path}: {' '.join(str(err).split())[:200]}") from err
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id) or "")
    return tokenizer


class PromptEncoder:
    """Prompts -> the denoiser's text conditions: every encoder's states, concatenated on the last axis (SDXL's
    two; one for SD 1.x/2.x and PixArt) as `encoder_hidden_states`, the pooled embedding where an encoder gives
    one, and the tokens' mask as `encoder_attention_mask` where an encoder takes one."""

    def __init__(
        self,
        bundle: Bundle,
        threads: int | None = None,
        warn=None,
        backend: str = "onnxruntime",
        options: RunOptions | None = None,
    ) -> None:
        parts = bundle.manifest.text_to_image
        self.parts = parts.encoders
        self.tokenizers = [load_tokenizer(bundle.file(p.tokenizer), p.max_length, p.pad_id) for p in self.parts]
        self.encoders = [part_backend(bundle, p.graph, backend, options or RunOptions(threads)) for p in self.parts]
        self.warn = warn or print_warning

    def tokens(self, prompts: Sequence[str], which: int = 0) -> dict[str, np.ndarray]:
        """The encoder's inputs for `prompts`: token ids, and the attention mask where the encoder takes one."""
        part = self.parts[which]
        texts = [p.lower().strip() for p in prompts] if part.lowercase else list(prompts)
        encodings = self.tokenizers[which].encode_batch(texts)
        cut = [p for p, e in zip(prompts, encodings) if e.overflowing]
        if cut and which == 0:
            self.warn(
                f"{len(cut)} prompt(s) truncated to the text encoder's {part.max_length} tokens, as "
                f"diffusers does (first: {cut[0][:60]!r})"
            )
        found = {"input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64)}
        if part.attention_mask:
            found["attention_mask"] = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        return found

    def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        states, found = [], {}
        for which, (part, encoder) in enumerate(zip(self.parts, self.encoders)):
            tokens = self.tokens(prompts, which)
            outputs = encoder.run(tokens)
            states.append(outputs[0].astype(np.float32))
            if part.pooled:
                found["text_embeds"] = outputs[1].astype(np.float32)
            if part.attention_mask:
                found["encoder_attention_mask"] = tokens["attention_mask"].astype(np.float32)
        return {"encoder_hidden_states": np.concatenate(states, axis=-1), **found}


class LatentDecoder:
    """Latents -> images in [-1, 1] through a VAE decoder graph (a bundle's, or one being staged by the export)."""

    def __init__(
        self, graph: Path | Backend, scaling_factor: float, shift_factor: float = 0.0, threads: int | None = None
    ) -> None:
        self.vae = graph if callable(graph) else OnnxRuntimeBackend(graph, threads)
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor

    @classmethod
    def of(
        cls, bundle: Bundle, threads: int | None = None, backend: str = "onnxruntime", options: RunOptions | None = None
    ) -> LatentDecoder:
        parts = bundle.manifest.text_to_image
        vae = part_backend(bundle, parts.vae_decoder, backend, options or RunOptions(threads))
        return cls(vae, parts.scaling_factor, parts.shift_factor)

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        scaled = np.asarray(latents, np.float32) / np.float32(self.scaling_factor) + np.float32(self.shift_factor)
        return np.clip(self.vae.run({"latent_sample": scaled})[0], -1.0, 1.0)

    def in_batches(self, latents: np.ndarray, batch: int = 32) -> np.ndarray:
        """Many latents decoded `batch` at a time (a VAE decoder's activations grow with the batch)."""
        return np.concatenate([self(latents[i : i + batch]) for i in range(0, len(latents), batch)])


@dataclass(frozen=True)
class GenerateRequest:
    """What `generate` makes: `n` images per prompt (prompt-major, as diffusers' num_images_per_prompt), seeds
    seed .. seed + len(prompts) * n - 1."""

    prompts: tuple[str, ...]
    negative_prompt: str | None = None  # None: the pipeline's default (the empty prompt, or SDXL's zeros)
    n: int = 1
    seed: int = 0
    graph: str = "quantized"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("no prompt given: pass --prompt (repeatable) or --prompts-file")
        if self.graph not in GRAPHS:
            raise ValueError(f"--graph must be one of {', '.join(GRAPHS)}, got {self.graph!r}")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError("--n and --batch-size must be at least 1")

    @property
    def count(self) -> int:
        return len(self.prompts) * self.n


def require_text_to_image(bundle: Bundle) -> None:
    if bundle.manifest.text_to_image is None:
        how = "--classes" if bundle.manifest.class_table else "--conditioning"
        raise BundleError(
            f"bundle {bundle.path} has no tokenizer or text encoder (a denoiser-only bundle): "
            f"`stepquant sample --bundle {bundle.path} {how} ...` runs it"
        )


def text_conditioning(bundle: Bundle, encoder: PromptEncoder, request: GenerateRequest) -> Conditioning:
    """The denoiser's condition rows for `request`, as diffusers' pipelines build them: each prompt's rows
    repeated `n` times; the negative prompt's (the empty prompt's, or zeros where the pipeline says
    force_zeros_for_empty_prompt and none was given) for guidance; the fixed conditions (SDXL's size/crop ids,
    PixArt-alpha's resolution and aspect ratio) on both."""
    parts = bundle.manifest.text_to_image
    cond = {k: np.repeat(v, request.n, axis=0) for k, v in encoder(list(request.prompts)).items()}
    if request.negative_prompt is None and parts.zero_negative:
        uncond = {k: np.zeros_like(v[:1]) for k, v in cond.items()}
    else:
        uncond = encoder([request.negative_prompt or ""])
    for name, value in parts.fixed_conditions.items():
        row = np.asarray([value], dtype=np.float32)
        cond[name], uncond[name] = np.repeat(row, len(next(iter(cond.values()))), axis=0), row
    return Conditioning(cond, uncond)


def generate_batches(
    bundle: Bundle,
    request: GenerateRequest,
    config: SamplerConfig,
    threads: int | None = None,
    backend: str = "onnxruntime",
    engine: Path | None = None,
    corrections: bool = True,
    progress: bool = True,
    warn=None,
    *,
    provider: str = "cpu",
    device: str = "CPU",
    denoiser: Backend | None = None,
) -> Iterator[np.ndarray]:
    """Images [B, 3, H, W] in [-1, 1], batch by batch, for `request` (see the module docstring). The text
    encoders and the VAE decoder run on `backend` too (on TensorRT where their plans were built). `denoiser`
    stands in for the bundle's graphs, uncorrected: another tool's quantized model, compared through the same
    text encoder and VAE decoder."""
    from tqdm.auto import tqdm

    require_text_to_image(bundle)
    table = bundle_table(bundle, config)
    table.check_sampler(config.scheduler, config.steps, config.eta, config.karras_sigmas)
    options = RunOptions(threads, provider, None, device, engine)
    if denoiser is not None:
        runner, terms = denoiser, None
    elif request.graph == "reference":
        runner, terms = reference_backend(bundle, backend=backend, options=options), None
    else:
        runner = quantized_backend(bundle, threads, backend, engine, provider=provider, device=device)
        terms = bundle_corrections(bundle, config) if corrections else None
    conditioning = text_conditioning(
        bundle, PromptEncoder(bundle, warn=warn, backend=backend, options=options), request
    )
    decoder = LatentDecoder.of(bundle, backend=backend, options=options)
    latents = sample_batches(
        runner,
        table,
        range(request.seed, request.seed + request.count),
        bundle.manifest.sample_shape,
        config,
        request.batch_size,
        progress=progress,
        desc="denoising",
        corrections=terms,
        conditioning=conditioning,
        clip=False,
    )
    decoding = tqdm(total=request.count, desc="decoding", unit="image", disable=not progress, leave=False)
    for batch in latents:
        images = decoder(batch)
        decoding.update(len(images))
        yield images
    decoding.close()


def generate(
    bundle: Bundle | str | Path,
    prompts: str | Sequence[str],
    negative_prompt: str | None = None,
    n: int = 1,
    seed: int = 0,
    guidance_scale: float | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    graph: str = "quantized",
    backend: str = "onnxruntime",
    threads: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """The Python API of `stepquant generate`: uint8 images [len(prompts) * n, H, W, 3] (prompt-major), from a
    whole-pipeline bundle (a path is loaded and verified), with the bundle's sampler unless told otherwise."""
    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    request = GenerateRequest(
        (prompts,) if isinstance(prompts, str) else tuple(prompts), negative_prompt, n, seed, graph
    )
    config = bundle_sampler(loaded, scheduler=scheduler, steps=steps, guidance_scale=guidance_scale)
    return to_uint8(
        np.concatenate(list(generate_batches(loaded, request, config, threads, backend, progress=progress)))
    )


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] -> uint8 [N, H, W, C], rounded as diffusers' VaeImageProcessor does."""
    return (np.clip(np.asarray(images) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
