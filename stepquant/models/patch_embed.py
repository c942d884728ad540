"""A PatchEmbed whose positional embedding follows the input's size inside an exported graph.

diffusers' PatchEmbed keeps the sin-cos table of its native size and recomputes it behind a Python `if` when
the size differs; tracing freezes that branch, so a graph exported at one size fails at another. This
subclass always computes the table from the input's shape with the same diffusers function, which traces
to shape arithmetic: identical values at every size, and dynamic height/width in the graph.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed
from torch import nn


class ShapeFollowingPatchEmbed(PatchEmbed):
    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        height, width = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        latent = self.proj(latent)
        if self.flatten:
            latent = latent.flatten(2).transpose(1, 2)  # BCHW -> BNC
        if self.layer_norm:
            latent = self.norm(latent)
        pos_embed = get_2d_sincos_pos_embed(
            self.pos_embed.shape[-1],
            (height, width),
            base_size=self.base_size,
            interpolation_scale=self.interpolation_scale,
            device=latent.device,
            output_type="pt",
        )
        return (latent + pos_embed.float().unsqueeze(0)).to(latent.dtype)


def follow_input_shape_(model: nn.Module) -> None:
    """Swap, in place, every sin-cos PatchEmbed without a cropping table for the shape-following one."""
    for module in model.modules():
        if type(module) is PatchEmbed and module.pos_embed is not None and module.pos_embed_max_size is None:
            module.__class__ = ShapeFollowingPatchEmbed
