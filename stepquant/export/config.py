"""What `export_quantized` is asked to do, as plain data: `ExportConfig` and the small configs it is made of,
each checking its own values when built (one line naming the option), the config checking how they combine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stepquant.bundle.targets import TARGETS, TENSORRT
from stepquant.calibrators.calibrate import CALIBRATORS, TRAJECTORY_CALIBRATORS
from stepquant.calibrators.reconstruction import ReconstructionConfig
from stepquant.export.precision import PRECISIONS
from stepquant.export.samplers import check_samplers
from stepquant.export.shapes import ShapeProfile
from stepquant.models import DEMO_MODEL_NAME
from stepquant.quant import QuantSpec
from stepquant.runtime.corrections import METHODS as CORRECTION_METHODS
from stepquant.runtime.sampler import SamplerConfig
from stepquant.runtime.seeding import MAX_SEED

PERCENTILE_RANGE = (50.0, 100.0)  # of |x|: below the median there is nothing left to clip


def _at_least_one(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Which FP trajectories the scales are calibrated on, by which calibrator, into how many timestep groups
    (graphs with their own activation scales)."""

    calibrator: str = "minmax"
    percentile: float = 99.99
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    samples: int = 64  # trajectories (seeded noise samples)
    batch: int = 8  # seeds per trajectory batch: the unit torchrun's processes share out
    steps: int | None = None  # sampler steps kept per trajectory; None keeps every step
    timestep_groups: int = 1  # split where ranges change most
    steps_per_group: int | None = None  # instead: a new group every N sampler steps

    def __post_init__(self) -> None:
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"unknown calibrator {self.calibrator!r}; choose from {', '.join(CALIBRATORS)}")
        if self.timestep_groups > 1 and self.steps_per_group is not None:
            raise ValueError("give either --timestep-groups or --steps-per-group, not both")
        _at_least_one(calib_samples=self.samples, calib_batch=self.batch, timestep_groups=self.timestep_groups)
        if not PERCENTILE_RANGE[0] < self.percentile <= PERCENTILE_RANGE[1]:
            hint = f" (a percent: did you mean {self.percentile * 100:g}?)" if 0 < self.percentile <= 1 else ""
            raise ValueError(
                f"--percentile must be in ({PERCENTILE_RANGE[0]:g}, {PERCENTILE_RANGE[1]:g}], got "
                f"{self.percentile:g}{hint}"
            )

    @property
    def grouped(self) -> bool:
        return self.timestep_groups > 1 or self.steps_per_group is not None

    def check_sampler(self, sampler: SamplerConfig) -> None:
        """Refuse step counts beyond the sampler's, and a trajectory calibrator on a sampler it cannot unroll."""
        for name, value in (
            ("timestep_groups", self.timestep_groups),
            ("calib_steps", self.steps),
            ("steps_per_group", self.steps_per_group),
        ):
            if value is not None and not 1 <= value <= sampler.steps:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be between 1 and the {sampler.steps} sampler steps, got {value}"
                )
        if self.calibrator in TRAJECTORY_CALIBRATORS and sampler.scheduler not in ("ddim", "ddpm"):
            raise ValueError(
                f"--calibrator {self.calibrator} unrolls DDIM steps from the calibration states, which only "
                f"DDIM and DDPM trajectories provide: use --scheduler ddim or ddpm with it (not {sampler.scheduler})"
            )


@dataclass(frozen=True)
class CorrectionConfig:
    """Per-timestep correction terms estimated on the deployed graph (see stepquant.runtime.corrections)."""

    method: str = "none"
    per_branch: bool = False  # guided: fit the terms to both branches' outputs, not the guided estimate

    def __post_init__(self) -> None:
        if self.method not in CORRECTION_METHODS:
            raise ValueError(f"unknown correction {self.method!r}; choose from {', '.join(CORRECTION_METHODS)}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass(frozen=True)
class ConditioningConfig:
    """What a conditional model is calibrated under: prompts (one per line, encoded by the pipeline's text
    encoder), a conditioning file, or class table rows (default: every class)."""

    prompts_file: Path | None = None
    file: Path | None = None
    classes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ChecksConfig:
    """How the export checks its graphs: the PSNR seeds, the parity inputs, and whether a failure stops it."""

    eval_samples: int = 256
    parity_timesteps: int = 5
    parity_batch: int = 4
    require_parity: bool = (
        True  # stop when the layer-wise parity check fails (else keep the bundle, recorded as failed)
    )

    def __post_init__(self) -> None:
        _at_least_one(
            eval_samples=self.eval_samples, parity_timesteps=self.parity_timesteps, parity_batch=self.parity_batch
        )


@dataclass(frozen=True)
class ExportConfig:
    model: str = DEMO_MODEL_NAME
    out: Path = Path("out/demo-digits-w8a8")
    quant: QuantSpec = field(default_factory=QuantSpec)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # calibrated for, evaluated with, the default
    more_samplers: tuple[SamplerConfig, ...] = ()  # also stored: each with its table and correction terms
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    precision: str = "fp32"  # float compute and Q/DQ scales of the quantized graph: fp32 or fp16
    targets: tuple[str, ...] = (TENSORRT.name,)  # placement profiles, one graph each from one calibration
    shapes: ShapeProfile = field(default_factory=ShapeProfile)  # batch/height/width/sequence ranges of the graphs
    seed: int = 0  # of calibration and evaluation noise
    device: str = "auto"  # where torch runs: auto, cpu, cuda, cuda:N (graphs are traced on the CPU)
    dtype: str = "float32"  # float type of the FP reference on that device (quantizers compute in float32)
    engine: bool = False  # also build the TensorRT engine (needs tensorrt on this machine)
    sign_key: Path | None = None  # Ed25519 private key that signs the bundle's manifest
    overwrite: bool = False
    progress: bool = True

    @property
    def samplers(self) -> tuple[SamplerConfig, ...]:
        return (self.sampler, *self.more_samplers)

    def __post_init__(self) -> None:
        """What no part can check alone: how the parts combine."""
        check_samplers(self.samplers)
        self.calibration.check_sampler(self.sampler)
        if self.correction.per_branch and (not self.correction.enabled or self.sampler.guidance_scale == 1.0):
            raise ValueError(
                "--correction-per-branch fits a --correction's terms to the two branches of guided sampling: "
                "give --correction and a --guidance-scale other than 1"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and self.quant.format == "fp8":
            raise ValueError("--precision fp16 is for int8 bundles; fp8 bundles keep FP32 outside the Q/DQ pairs")
        if (
            not self.targets
            or any(t not in TARGETS for t in self.targets)
            or len(set(self.targets)) < len(self.targets)
        ):
            raise ValueError(f"targets must be distinct values from {', '.join(TARGETS)}, got {list(self.targets)}")
        for profile in map(TARGETS.get, self.targets):
            if not profile.serves(self.quant.format, self.precision):
                raise ValueError(
                    f"the {profile.name} target serves --format {'/'.join(profile.formats)} at --precision "
                    f"{'/'.join(profile.precisions)}: drop --format {self.quant.format} / --precision "
                    f"{self.precision} for it"
                )
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
