"""Latents to images with the pipeline's own VAE (Stable Diffusion, SDXL and PixArt sample latents)."""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def decode_latents(pipeline_dir: Path, latents: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Images in [-1, 1] decoded from `latents` by `pipeline_dir/vae` (scaled by its scaling_factor, as
    diffusers' pipelines do)."""
    from diffusers import AutoencoderKL

    latents = torch.as_tensor(latents)
    vae_dir = Path(pipeline_dir) / "vae"
    if not (vae_dir / "config.json").is_file():
        raise ValueError(f"{pipeline_dir} has no vae/ to decode latents with")
    from stepquant.models.loading import require_safetensors

    require_safetensors(vae_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval()
    if vae.config.latent_channels != latents.shape[1]:
        raise ValueError(
            f"the VAE takes {vae.config.latent_channels}-channel latents, the samples have {latents.shape[1]}"
        )
    shift = vae.config.shift_factor or 0.0
    images = [vae.decode(batch / vae.config.scaling_factor + shift).sample for batch in latents.split(batch_size)]
    return torch.cat(images).clamp(-1.0, 1.0)
