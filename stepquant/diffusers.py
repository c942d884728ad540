"""A bundle's denoiser as a drop-in for a diffusers pipeline: `pipe.unet = from_bundle(DIR)` (or
`pipe.transformer = ...` for PixArt), for users who keep torch and diffusers on the serving machine.

The object is a `torch.nn.Module` with the replaced module's call signature, output types (`return_dict` True
or False), `.config` (the denoiser's config.json the bundle carries), `.dtype` and `.device`; each call runs
the bundle's graph on the chosen backend (onnxruntime, OpenVINO or TensorRT, as `stepquant sample` does) on
numpy copies of the tensors, and hands the result back on the input's device and dtype.

The bundle's per-timestep gain and bias are applied to the graph's estimate as the runtime's sampler applies
them: an affine map, and classifier-free guidance combines the two halves of its batch with weights summing to
one, so correcting each half gives what the sampler's correction of the combined estimate gives. What only the
sampler's loop can do is left out with a one-line warning: TAC's input bias (it corrects the sampler's state),
the noise D2's stochastic variant adds, the variance schedule PTQD/D2 shrink on stochastic samplers; so is the
correction at a timestep the terms do not cover (another scheduler or step count).

`pipeline_from_bundle(DIR)` goes one step further for a whole-pipeline bundle: diffusers' own
StableDiffusion(XL)Pipeline or PixArtSigmaPipeline made of the bundle's tokenizers, text encoder graphs, denoiser
and VAE decoder graph, with no pipeline directory on the serving machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from stepquant.bundle import Bundle, BundleError, load_bundle
from stepquant.bundle.manifest import TextEncoderPart, TextToImage
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
from stepquant.runtime.corrections import CorrectionError, Corrections
from stepquant.runtime.sampler import SamplerConfig
from stepquant.runtime.text_to_image import GRAPHS, load_tokenizer, print_warning, require_text_to_image

Warn = Callable[[str], None]


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32).numpy()
    return np.asarray(value, dtype=np.float32)


class BundleDenoiser(torch.nn.Module):
    """What every drop-in shares: the graph call with the bundle's corrections (see the module docstring)."""

    def __init__(
        self, backend: Backend, config: dict[str, Any], corrections: Corrections | None = None, warn: Warn | None = None
    ) -> None:
        super().__init__()
        self.backend = backend
        self.config = FrozenDict(config)
        self.corrections = corrections
        self.warn = warn or print_warning
        self._warned_uncovered = False

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # the graphs take and give float32 (the Q/DQ nodes inside are the graph's business)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where the tensors are read from; outputs go back to the input's device

    def _terms(self, timestep: float) -> Corrections | None:
        if self.corrections is None:
            return None
        try:
            self.corrections.index(int(timestep))
        except CorrectionError:
            if not self._warned_uncovered:
                self.warn(
                    f"the bundle's {self.corrections.method} corrections do not cover timestep {int(timestep)} (they "
                    f"cover {len(self.corrections.timesteps)} timesteps of its own sampler): those steps run "
                    "uncorrected"
                )
            self._warned_uncovered = True
            return None
        return self.corrections

    def _corrected(self, x: np.ndarray, steps: np.ndarray, feeds: dict[str, np.ndarray], t: float) -> np.ndarray:
        terms = self._terms(t)
        eps = self.backend(x, steps, **feeds)
        return eps if terms is None else terms.correct_mean(eps, int(t))

    def estimate(self, sample: torch.Tensor, timestep: Any, conditions: dict[str, Any]) -> torch.Tensor:
        """The graph's noise estimate for `sample` at `timestep` (a number, a 0-d or a [B] tensor), corrected."""
        x = _numpy(sample)
        steps = np.broadcast_to(_numpy(timestep).reshape(-1), (len(x),)).astype(np.float32)
        feeds = {name: _numpy(value) for name, value in conditions.items() if value is not None}
        if (steps == steps[0]).all():  # a pipeline's batch shares its timestep: no copies
            out = self._corrected(x, steps, feeds, float(steps[0]))
        else:
            out = np.empty_like(x)
            for t in np.unique(steps).tolist():
                rows = steps == t
                out[rows] = self._corrected(x[rows], steps[rows], {k: v[rows] for k, v in feeds.items()}, t)
        return torch.from_numpy(out).to(sample.device, sample.dtype)


def _refuse_extras(**extras: Any) -> None:
    given = [name for name, value in extras.items() if value is not None]
    if given:
        raise ValueError(
            f"a bundle's compiled graph takes no {', '.join(given)}: the drop-in runs the exported denoiser only"
        )


class BundleUNet(BundleDenoiser):
    """In place of `pipe.unet`: diffusers' UNet2DModel and UNet2DConditionModel call signature."""

    def __init__(
        self, backend: Backend, config: dict[str, Any], corrections: Corrections | None = None, warn: Warn | None = None
    ) -> None:
        super().__init__(backend, config, corrections, warn)
        if config.get("addition_embed_type") == "text_time":  # SDXL's pipeline checks the pooled projection's width
            width = config["projection_class_embeddings_input_dim"]
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
        down_intrinsic_block_additional_residuals=None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        _refuse_extras(
            class_labels=class_labels,
            timestep_cond=timestep_cond,
            attention_mask=attention_mask,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
            down_intrinsic_block_additional_residuals=down_intrinsic_block_additional_residuals,
            encoder_attention_mask=encoder_attention_mask,
        )
        added = added_cond_kwargs or {}
        eps = self.estimate(
            sample,
            timestep,
            {
                "encoder_hidden_states": encoder_hidden_states,
                "text_embeds": added.get("text_embeds"),
                "time_ids": added.get("time_ids"),
            },
        )
        output = UNet2DOutput if encoder_hidden_states is None else UNet2DConditionOutput
        return output(sample=eps) if return_dict else (eps,)


class BundleTransformer(BundleDenoiser):
    """In place of `pipe.transformer`: PixArtTransformer2DModel's call signature. The graph gives the noise
    half only, so `.config.out_channels` says the sample's channels (the pipeline then splits nothing off)."""

    def __init__(
        self, backend: Backend, config: dict[str, Any], corrections: Corrections | None = None, warn: Warn | None = None
    ) -> None:
        super().__init__(backend, {**config, "out_channels": config["in_channels"]}, corrections, warn)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: Any = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        _refuse_extras(attention_mask=attention_mask)
        added = added_cond_kwargs or {}
        eps = self.estimate(
            hidden_states,
            timestep,
            {
                "encoder_hidden_states": encoder_hidden_states,
                "encoder_attention_mask": encoder_attention_mask,
                "resolution": added.get("resolution"),
                "aspect_ratio": added.get("aspect_ratio"),
            },
        )
        return Transformer2DModelOutput(sample=eps) if return_dict else (eps,)


DROP_INS: dict[str, type[BundleDenoiser]] = {
    "UNet2DModel": BundleUNet,
    "UNet2DConditionModel": BundleUNet,
    "PixArtTransformer2DModel": BundleTransformer,
}


def _denoiser_config(bundle: Bundle, config: dict | None) -> dict[str, Any]:
    if config is not None:
        return dict(config)
    name = bundle.manifest.denoiser_config
    if name is None:
        raise BundleError(
            f"bundle {bundle.path} carries no denoiser config (exported by an older stepquant): re-export "
            "it, or pass config=pipe.unet.config"
        )
    try:
        return json.loads(bundle.file(name).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"bundle {bundle.path}: cannot read {name}: {err}") from err


def _sampler_only_terms(bundle: Bundle, corrections: Corrections, sampler: SamplerConfig | None) -> str | None:
    """What of `corrections` the drop-in cannot apply (None: nothing)."""
    if corrections.input_bias.any():
        return "the input bias, which corrects the sampler's state"
    if corrections.noise_std.any():
        return "the noise D2's stochastic corrections add"
    if corrections.residual_var.any() and bundle_table(bundle, sampler).stochastic:
        return "the shrunk variance schedule of its stochastic sampler"
    return None


def from_bundle(
    bundle: str | Path | Bundle,
    backend: str = "onnxruntime",
    graph: str = "quantized",
    corrections: bool = True,
    threads: int | None = None,
    provider: str = "cpu",
    device: str = "CPU",
    engine: Path | None = None,
    config: dict | None = None,
    warn: Warn | None = None,
    sampler: str | None = None,
) -> BundleDenoiser:
    """The bundle's denoiser (its quantized graph, or the FP32 `graph="reference"`) as a drop-in for
    `pipe.unet` / `pipe.transformer` (a path is loaded and verified), applying the correction terms of the
    stored `sampler` (a spec such as "dpm-solver++:20"; default: the bundle's first). `config` stands in for a
    bundle that carries no denoiser config."""
    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    denoiser_config = _denoiser_config(loaded, config)
    kind = denoiser_config.get("_class_name")
    if kind not in DROP_INS:
        raise BundleError(f"bundle {loaded.path}: its denoiser is {kind!r}; the drop-in replaces {', '.join(DROP_INS)}")
    options = RunOptions(threads, provider, None, device, engine)
    warn = warn or print_warning
    chosen = None if sampler is None else SamplerConfig.parse(sampler)
    if chosen is not None:
        bundle_table(loaded, chosen)  # a sampler the bundle does not store: one line naming those it does
    terms = bundle_corrections(loaded, chosen) if corrections and graph == "quantized" else None
    if terms is not None and (left_out := _sampler_only_terms(loaded, terms, chosen)):
        warn(
            f"the drop-in applies the bundle's {terms.method} gain and bias, not {left_out}: "
            "`stepquant sample` / `generate` apply all of it"
        )
    if graph == "reference":
        runner = reference_backend(loaded, backend=backend, options=options)
    else:
        runner = quantized_backend(loaded, threads, backend, engine, provider=provider, device=device)
    return DROP_INS[kind](runner, denoiser_config, terms, warn)


class _EncoderOutput(tuple):
    """What diffusers' encode_prompt reads of a CLIP text model's output: [0] (the last states, or the pooled
    embedding of a projection model) and `.hidden_states[-2]` (SDXL's penultimate states)."""

    hidden_states: tuple[torch.Tensor, ...]


class BundleTextEncoder(torch.nn.Module):
    """In place of `pipe.text_encoder` / `pipe.text_encoder_2`: the bundle's text encoder graph, which gives the
    states the denoiser reads (and, for SDXL's second encoder, the pooled embedding) from token ids (and, for
    T5, their attention mask)."""

    def __init__(self, backend: Backend, part: TextEncoderPart, projection_dim: int | None = None) -> None:
        super().__init__()
        self.backend, self.pooled, self.masked = backend, part.pooled, part.attention_mask
        self.config = SimpleNamespace(projection_dim=projection_dim)

    dtype = BundleDenoiser.dtype
    device = BundleDenoiser.device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> _EncoderOutput:
        inputs = {"input_ids": input_ids.detach().to("cpu", torch.int64).numpy()}
        if self.masked:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            inputs["attention_mask"] = mask.detach().to("cpu", torch.int64).numpy()
        outputs = self.backend.run(inputs)
        states = torch.from_numpy(np.asarray(outputs[0], np.float32)).to(input_ids.device)
        first = torch.from_numpy(np.asarray(outputs[1], np.float32)).to(input_ids.device) if self.pooled else states
        output = _EncoderOutput((first,))
        output.hidden_states = (states, states)  # the graph's states are the ones the pipeline picks
        return output


class BundleVAE(torch.nn.Module):
    """In place of `pipe.vae` for generating: `decode` runs the bundle's VAE decoder graph; `.config` holds what
    the pipelines read (the scaling factor, and block_out_channels of the length that gives their
    vae_scale_factor)."""

    def __init__(self, backend: Backend, parts: TextToImage, latent_channels: int) -> None:
        super().__init__()
        self.backend = backend
        self.config = FrozenDict(
            scaling_factor=parts.scaling_factor,
            shift_factor=parts.shift_factor or None,
            latent_channels=latent_channels,
            force_upcast=False,
            block_out_channels=[0] * (parts.vae_scale_factor.bit_length()),
        )

    dtype = BundleDenoiser.dtype
    device = BundleDenoiser.device

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        image = torch.from_numpy(np.asarray(self.backend.run({"latent_sample": _numpy(z)})[0], np.float32)).to(z.device)
        return DecoderOutput(sample=image) if return_dict else (image,)


def _tokenizer(bundle: Bundle, part: TextEncoderPart):
    """The bundle's tokenizer.json as transformers' fast tokenizer, padding and truncating as the runtime does."""
    from transformers import PreTrainedTokenizerFast

    device = load_tokenizer(bundle.file(part.tokenizer), part.max_length, part.pad_id)
    return PreTrainedTokenizerFast(
        tokenizer_object=device, model_max_length=part.max_length, pad_token=device.id_to_token(part.pad_id)
    )


def pipeline_from_bundle(
    bundle: str | Path | Bundle,
    backend: str = "onnxruntime",
    graph: str = "quantized",
    corrections: bool = True,
    sampler: str | None = None,
    threads: int | None = None,
    provider: str = "cpu",
    device: str = "CPU",
    warn: Warn | None = None,
):
    """A whole-pipeline bundle as diffusers' own StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL's
    two encoders, PixArtSigmaPipeline for a T5 and a transformer): the bundle's tokenizers, text encoders,
    denoiser (`from_bundle`) and VAE decoder on `backend`, and the stored `sampler`'s scheduler (default: the
    bundle's first). Call it with that sampler's steps (`num_inference_steps`) for its correction terms to
    apply; a PixArt pipeline with `use_resolution_binning=False` at a size the bundle takes, and
    `clean_caption=False` (the bundle's runtime lowercases and strips, as diffusers then does)."""
    from diffusers import PixArtSigmaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from stepquant.models.schedulers import make_scheduler

    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    require_text_to_image(loaded)
    manifest, parts = loaded.manifest, loaded.manifest.text_to_image
    unet = from_bundle(loaded, backend, graph, corrections, threads, provider, device, warn=warn, sampler=sampler)
    options = RunOptions(threads, provider, None, device)
    projection = unet.config.get("projection_class_embeddings_input_dim")
    if projection is not None:  # SDXL: the pooled width is what the add embedding takes beyond the six time ids
        projection -= 6 * unet.config["addition_time_embed_dim"]
    encoders = [
        BundleTextEncoder(part_backend(loaded, p.graph, backend, options), p, projection if p.pooled else None)
        for p in parts.encoders
    ]
    tokenizers = [_tokenizer(loaded, p) for p in parts.encoders]
    vae = BundleVAE(part_backend(loaded, parts.vae_decoder, backend, options), parts, manifest.sample_shape[0])
    chosen = bundle_sampler(loaded, **(SamplerConfig.parse(sampler).fields if sampler else {}))
    scheduler = make_scheduler(chosen, manifest.noise_schedule)
    if isinstance(unet, BundleTransformer):
        return PixArtSigmaPipeline(
            tokenizer=tokenizers[0], text_encoder=encoders[0], vae=vae, transformer=unet, scheduler=scheduler
        )
    if len(encoders) == 1:
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=tokenizers[0],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=parts.zero_negative,
        add_watermarker=False,
    )
