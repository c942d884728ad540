"""What to quantize and how, as plain data (like torchao configs): bit widths and layer exclusions."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from stepquant.quant.grid import Fp8Grid, Grid, IntGrid

FORMATS = ("int8", "fp8")

# modelopt's diffusers default (utils.filter_func_default) plus its library-wide `proj_out`: embeddings,
# the first and last convolutions and the shortcut convolutions stay in floating point. PixArt's timestep
# and caption embedders (adaln_single, caption_projection) are the same kind of layer under other names.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"time_emb_proj",
    r"time_embedding",
    r"conv_in",
    r"conv_out",
    r"conv_shortcut",
    r"add_embedding",
    r"pos_embed",
    r"time_text_embed",
    r"context_embedder",
    r"norm_out",
    r"x_embedder",
    r"proj_out",
    r"adaln_single",
    r"caption_projection",
)


@dataclass(frozen=True)
class QuantSpec:
    """Weights per output channel on a symmetric narrow grid, activations per tensor, zero point 0.

    `exclude` holds regular expressions searched in module names (e.g. `down_blocks.0.resnets.0.conv1`);
    a matching Conv2d/Linear stays in floating point.
    """

    weight_bits: int = 8
    act_bits: int = 8
    exclude: tuple[str, ...] = field(default=DEFAULT_EXCLUDE)
    format: str = "int8"  # or "fp8": E4M3 for Ada/Hopper, per-tensor weights as modelopt's FP8 config
    quantize_residuals: bool = True  # Q/DQ on the skip input of ResNet residual Adds (TensorRT fuses Conv+Add)
    split_skip_concat: bool = False  # separate quantizers for h and skip in decoder layers fed cat([h, skip])
    # fp8 only: Q/DQ on the attention matmuls' inputs (TensorRT's FP8 fused MHA). Off by default, as modelopt's
    # --quantize-mha: on the demo model it moves the t = 0 parity from 2.3e-3 to 1.7e-2 (FP8 softmax flips)
    fp8_attention: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose from {', '.join(FORMATS)}")
        if self.fp8_attention and self.format != "fp8":
            raise ValueError("attention matmul quantization is FP8 only (TensorRT has no INT8 fused attention)")
        if self.format == "fp8" and (self.weight_bits, self.act_bits) != (8, 8):
            raise ValueError("fp8 is E4M3 for weights and activations: weight and activation bits must be 8")
        for name, bits in (("weight", self.weight_bits), ("activation", self.act_bits)):
            if bits not in (2, 3, 4, 5, 6, 7, 8):
                raise ValueError(f"{name} bits must be between 2 and 8, got {bits}")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"exclude pattern {pattern!r} is not a valid regular expression: {err}") from err

    @property
    def weight_grid(self) -> Grid:
        return Fp8Grid() if self.format == "fp8" else IntGrid(self.weight_bits, narrow=True)

    @property
    def act_grid(self) -> Grid:
        return Fp8Grid() if self.format == "fp8" else IntGrid(self.act_bits, narrow=False)

    @property
    def residual_grid(self) -> Grid:
        """Skip inputs stay at 8 bits (TensorRT's fused Conv+Add residual is INT8 or FP8) whatever act_bits."""
        return Fp8Grid() if self.format == "fp8" else IntGrid(8, narrow=False)

    @property
    def per_channel_weights(self) -> bool:
        return self.format == "int8"

    @property
    def opset(self) -> int:
        """ONNX opset of the exported graph: FLOAT8E4M3FN Q/DQ needs 19."""
        return 19 if self.format == "fp8" else 17

    def excludes(self, module_name: str) -> bool:
        return any(re.search(pattern, module_name) for pattern in self.exclude)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "exclude": list(self.exclude),
            "zero_point": 0,
            "weight_grid": str(self.weight_grid),
            "activation_grid": str(self.act_grid),
            "weight_granularity": "per-output-channel (axis 0)" if self.per_channel_weights else "per-tensor",
            "activation_granularity": "per-tensor",
        }
