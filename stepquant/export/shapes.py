"""The input shapes an exported graph accepts: a declared min/opt/max range for the batch, the (latent)
height and width, and the text sequence length. The ranges decide which graph axes are dynamic, are
written to the manifest, become TensorRT's optimisation profile, and their corners are parity-checked
at export. A range with min == max keeps that axis fixed in the graph."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from stepquant.bundle.manifest import SEQUENCE, ConditionInput

CORNERS = ("min", "max")


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"a shape range needs 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")

    @classmethod
    def fixed(cls, size: int) -> DimRange:
        return cls(size, size, size)

    @classmethod
    def parse(cls, text: str) -> DimRange:
        """'64' (fixed) or 'min:opt:max', e.g. '32:64:96'."""
        try:
            values = [int(v) for v in text.split(":")]
        except ValueError:
            values = []
        if len(values) not in (1, 3):
            raise ValueError(f"expected a size or min:opt:max, got {text!r}")
        return cls.fixed(values[0]) if len(values) == 1 else cls(*values)

    @property
    def dynamic(self) -> bool:
        return self.min != self.max


@dataclass(frozen=True)
class ShapeProfile:
    """Ranges of the network batch (with guidance: twice the images), latent height and width, and text
    sequence length. None: the model's native size (height/width) or the conditioning's length (sequence)."""

    batch: DimRange = DimRange(1, 8, 64)
    height: DimRange | None = None
    width: DimRange | None = None
    sequence: DimRange | None = None

    def working_shape(self, native: tuple[int, int, int], factor: int = 1) -> tuple[int, int, int]:
        """The sample shape export calibrates, checks and measures at: the model's native height and width
        where their ranges hold them, else each range's opt (so a profile for a smaller deployment need not
        hold the native size). Every range's min, opt and max must be a multiple of `factor`."""
        channels, *sizes = native
        working = []
        for name, size, dim in zip(("height", "width"), sizes, (self.height, self.width)):
            if dim is not None:
                bad = [v for v in (dim.min, dim.opt, dim.max) if v % factor]
                if bad:
                    raise ValueError(
                        f"the {name} range {dim.min}:{dim.opt}:{dim.max} holds {bad[0]}, not a multiple of "
                        f"{factor} (the model's downsampling): choose sizes that are"
                    )
            working.append(size if dim is None or dim.min <= size <= dim.max else dim.opt)
        return (channels, *working)

    def resolved(self, sample_shape: tuple[int, int, int], sequence: int | None) -> ShapeProfile:
        """Every range set: unset ones fixed to `sample_shape`'s size (working_shape's); `sequence` stays None
        without text inputs."""
        _, height, width = sample_shape
        for name, size, dim in (("height", height, self.height), ("width", width, self.width)):
            if dim is not None and not dim.min <= size <= dim.max:
                raise ValueError(f"the {name} range {dim.min}:{dim.max} does not contain the sample {name} {size}")
        return replace(
            self,
            height=self.height or DimRange.fixed(height),
            width=self.width or DimRange.fixed(width),
            sequence=(self.sequence or DimRange.fixed(sequence)) if sequence is not None else None,
        )

    @property
    def dynamic_sizes(self) -> bool:
        """Whether height, width or text length may vary (the batch always may)."""
        return any(d is not None and d.dynamic for d in (self.height, self.width, self.sequence))

    def dynamic_axes(self, conditions: tuple[ConditionInput, ...]) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes for (sample, timestep, *conditions) -> eps."""
        spatial = {0: "batch"}
        if self.height.dynamic:
            spatial[2] = "height"
        if self.width.dynamic:
            spatial[3] = "width"
        axes = {"sample": spatial, "timestep": {0: "batch"}, "eps": spatial}
        for condition in conditions:
            axes[condition.name] = {
                0: "batch",
                **{i + 1: SEQUENCE for i, d in enumerate(condition.shape) if d == SEQUENCE and self.sequence.dynamic},
            }
        return axes

    def input_shapes(
        self, channels: int, conditions: tuple[ConditionInput, ...], which: tuple[str, ...] = ("min", "opt", "max")
    ) -> dict[str, dict[str, tuple[int, ...]]]:
        """{input name: {min|opt|max: shape}} of a resolved profile: TensorRT's optimisation profile."""
        if self.height is None or self.width is None or (self.sequence is None and conditions):
            raise ValueError("resolve the shape profile (ShapeProfile.resolved) before asking for its shapes")
        shapes: dict[str, dict[str, tuple[int, ...]]] = {
            "sample": {},
            "timestep": {},
            **{c.name: {} for c in conditions},
        }
        for bound in which:
            batch = getattr(self.batch, bound)
            shapes["sample"][bound] = (batch, channels, getattr(self.height, bound), getattr(self.width, bound))
            shapes["timestep"][bound] = (batch,)
            for condition in conditions:
                shapes[condition.name][bound] = condition.concrete_shape(batch, getattr(self.sequence, bound))
        return shapes

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> ShapeProfile:
        return cls(**{k: DimRange(**v) for k, v in data.items()})


def resize_inputs(
    samples: torch.Tensor,
    conditions: dict[str, torch.Tensor],
    inputs: tuple[ConditionInput, ...],
    batch: int,
    height: int,
    width: int,
    sequence: int | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Network inputs of another shape made from recorded ones, for parity at a shape range's corners:
    rows repeated or cut to `batch`, samples resized bilinearly, text tokens repeated or cut to `sequence`.
    The values stay realistic; what is checked is that graph and simulation agree at that shape."""
    rows = torch.arange(batch) % len(samples)
    resized = F.interpolate(samples[rows], size=(height, width), mode="bilinear", align_corners=False)
    out = {}
    for condition in inputs:
        tensor = conditions[condition.name][rows]
        for axis, dim in enumerate(condition.shape, start=1):
            if dim == SEQUENCE:
                tensor = tensor.index_select(axis, torch.arange(sequence) % tensor.shape[axis])
        out[condition.name] = tensor
    return resized, out
