"""What to quantize and how, as plain data (like torchao configs): bit widths and layer exclusions."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

# modelopt's diffusers default (utils.filter_func_default) plus its library-wide `proj_out`: embeddings,
# the first and last convolutions and the shortcut convolutions stay in floating point.
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

    def __post_init__(self) -> None:
        for name, bits in (("weight", self.weight_bits), ("activation", self.act_bits)):
            if bits not in (2, 3, 4, 5, 6, 7, 8):
                raise ValueError(f"{name} bits must be between 2 and 8, got {bits}")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"exclude pattern {pattern!r} is not a valid regular expression: {err}") from err

    def excludes(self, module_name: str) -> bool:
        return any(re.search(pattern, module_name) for pattern in self.exclude)

    def to_dict(self) -> dict:
        return {**asdict(self), "exclude": list(self.exclude), "format": "int8", "zero_point": 0,
                "weight_granularity": "per-output-channel (axis 0)", "activation_granularity": "per-tensor"}
