"""The bundle's manifest, typed: read and validated once (`Manifest.from_dict`), written by the export
(`to_dict`), and read by the runtime and the commands as attributes, never by string key.

Sections the runtime does not act on (quantization spec, calibration, quality, versions...) travel as
plain data in `info` and in each target's `details`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 7  # 2: one section per target; 3: condition inputs and shape ranges; 4: layer-wise parity;
# 5: the sampler's scheduler table (the device loop needs no diffusers), typed manifest; 6: sample space, class table;
# 7: several samplers, each with its table and correction terms
READ_BY = {2: "0.1.0", 3: "0.1.0", 4: "0.1.0", 5: "0.2.0", 6: "0.3.0"}
MAX_SAMPLERS = 32  # older formats, and the stepquant release that reads them
SEQUENCE = "sequence"  # the symbolic text-length axis of a condition input
SAMPLE_SPACES = ("pixel", "latent")  # pixels in [-1, 1] (clipped by the sampler), or latents for a VAE
MAX_SAMPLE_ELEMENTS = 2**24  # one sample's values (channels x height x width): 4x2048x2048 latents, 3x2048x2048 pixels
OPTIMIZATION_LEVEL_NAMES = ("disable", "basic", "extended", "all")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BundleError(ValueError):
    """A bundle is missing, incomplete, of another format version, changed after export, or reaches outside
    itself; or a destination that is not a bundle would be replaced."""


@dataclass(frozen=True)
class _Check:
    """What every section reader is given: the manifest's name (for the one-line error) and its listed files."""

    where: str
    listed: frozenset[str]

    def __call__(self, condition: bool, what: str) -> None:
        if not condition:
            raise BundleError(f"{self.where} is not a valid stepquant manifest: {what}")

    def file(self, name: Any) -> bool:
        return name in self.listed


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_format_version(data: Any, where: str) -> None:
    """Refuse, in one line, a manifest of another format version, naming the stepquant release that reads it."""
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        reader = READ_BY.get(version) if isinstance(version, int) else None
        hint = (
            f"re-export it with this stepquant, or read it with stepquant {reader}"
            if reader
            else "it was not written by a stepquant this one knows"
        )
        raise BundleError(
            f"{where}: bundle format version {version!r} is not supported (this stepquant reads "
            f"{FORMAT_VERSION}): {hint}"
        )


@dataclass(frozen=True)
class ConditionInput:
    """One extra network input: its name and its shape after the batch axis (ints, or `SEQUENCE`)."""

    name: str
    shape: tuple[int | str, ...]

    def concrete_shape(self, batch: int, sequence: int) -> tuple[int, ...]:
        return (batch, *(sequence if d == SEQUENCE else d for d in self.shape))


@dataclass(frozen=True)
class TimestepGroup:
    graph: str  # the group's Q/DQ graph
    timesteps: list[float] | str  # the sampler timesteps it serves, or "all"
    parity: str  # its parity directory (inputs.json, reference_outputs.json)

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "timesteps": self.timesteps, "parity": self.parity}

    @classmethod
    def from_dict(cls, group: Any, target: str, need: _Check) -> TimestepGroup:
        need(
            isinstance(group, dict) and need.file(group.get("graph")),
            f"target {target!r}: every graph must be a listed file",
        )
        need(
            isinstance(group.get("parity"), str)
            and need.file(f"{group['parity']}/inputs.json")
            and need.file(f"{group['parity']}/reference_outputs.json"),
            f"target {target!r}: every group's parity data must be listed files",
        )
        need(
            group.get("timesteps") == "all"
            or (
                isinstance(group.get("timesteps"), list)
                and all(isinstance(t, (int, float)) for t in group["timesteps"])
            ),
            f"target {target!r}: a group's 'timesteps' must be 'all' or numbers",
        )
        return cls(group["graph"], group["timesteps"], group["parity"])


@dataclass(frozen=True)
class Target:
    """One target profile's graphs and what the export showed for them."""

    timestep_groups: list[TimestepGroup]
    parity: dict[str, Any]  # gate, passed, layerwise reports, end_to_end (with the replay tolerance)
    onnxruntime_optimization_level: str
    parity_optimization_level: str
    details: dict[str, Any] = field(default_factory=dict)  # quality, lint or integer kernels

    @property
    def replay_tolerance(self) -> float:
        return float(self.parity["end_to_end"]["tolerance_median_rel"])

    @property
    def graphs(self) -> list[str]:
        return [group.graph for group in self.timestep_groups]

    def to_dict(self) -> dict[str, Any]:
        return {
            "timestep_groups": [g.to_dict() for g in self.timestep_groups],
            "parity": self.parity,
            "onnxruntime_optimization_level": self.onnxruntime_optimization_level,
            "parity_optimization_level": self.parity_optimization_level,
            **self.details,
        }

    @classmethod
    def from_dict(cls, section: Any, name: str, need: _Check) -> Target:
        need(
            isinstance(section, dict)
            and isinstance(section.get("timestep_groups"), list)
            and section["timestep_groups"],
            f"target {name!r} needs its 'timestep_groups'",
        )
        groups = [TimestepGroup.from_dict(group, name, need) for group in section["timestep_groups"]]
        parity = section.get("parity")
        need(
            isinstance(parity, dict)
            and isinstance(parity.get("end_to_end"), dict)
            and isinstance(parity["end_to_end"].get("tolerance_median_rel"), (int, float)),
            f"target {name!r} needs its parity's end-to-end tolerance",
        )
        levels = (section.get("onnxruntime_optimization_level"), section.get("parity_optimization_level"))
        need(
            all(level in OPTIMIZATION_LEVEL_NAMES for level in levels),
            f"target {name!r} needs onnxruntime optimisation levels",
        )
        known = ("timestep_groups", "parity", "onnxruntime_optimization_level", "parity_optimization_level")
        return cls(groups, parity, *levels, {k: v for k, v in section.items() if k not in known})


@dataclass(frozen=True)
class Sampler:
    """The sampler the bundle was calibrated and evaluated with (its table is `Manifest.scheduler_table`)."""

    scheduler: str
    steps: int
    eta: float
    guidance_scale: float
    karras_sigmas: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, sampler: Any, need: _Check) -> Sampler:
        need(
            isinstance(sampler, dict)
            and isinstance(sampler.get("scheduler"), str)
            and type(sampler.get("steps")) is int
            and sampler["steps"] >= 1
            and all(isinstance(sampler.get(k), (int, float)) for k in ("eta", "guidance_scale")),
            "'sampler' must hold 'scheduler', 'steps', 'eta' and 'guidance_scale'",
        )
        return cls(
            sampler["scheduler"],
            sampler["steps"],
            float(sampler["eta"]),
            float(sampler["guidance_scale"]),
            bool(sampler.get("karras_sigmas", False)),
        )

    @property
    def key(self) -> tuple[str, int, float, bool]:
        """What tells two stored samplers apart (guidance is a run-time choice, the same for all of them)."""
        return self.scheduler, self.steps, self.eta, self.karras_sigmas

    @property
    def spec(self) -> str:
        """The sampler as `--sampler` writes it: SCHEDULER:STEPS[:karras][:eta=E]."""
        return ":".join(
            [
                self.scheduler,
                str(self.steps),
                *(["karras"] if self.karras_sigmas else []),
                *([f"eta={self.eta:g}"] if self.eta else []),
            ]
        )


@dataclass(frozen=True)
class StoredSampler:
    """One sampler the bundle can run: its record, the scheduler table captured from diffusers for it, and
    the correction terms fitted along its trajectories (None when the bundle has no corrections)."""

    sampler: Sampler
    scheduler_table: dict[str, Any]  # stepquant.runtime.scheduler_table.SchedulerTable.to_dict()
    correction_file: str | None = None
    quality: dict[str, Any] = field(default_factory=dict)  # its PSNR to FP where measured (information)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.to_dict(),
            "scheduler_table": self.scheduler_table,
            "correction_file": self.correction_file,
            "quality": self.quality,
        }

    @classmethod
    def from_dict(cls, entry: Any, need: _Check) -> StoredSampler:
        need(
            isinstance(entry, dict) and isinstance(entry.get("scheduler_table"), dict),
            "each of 'samplers' needs a 'sampler' and a 'scheduler_table'",
        )
        need(
            entry.get("correction_file") is None or need.file(entry["correction_file"]),
            "a sampler's 'correction_file' must be null or a listed file",
        )
        need(isinstance(entry.get("quality", {}), dict), "a sampler's 'quality' must be an object")
        return cls(
            Sampler.from_dict(entry.get("sampler"), need),
            entry["scheduler_table"],
            entry.get("correction_file"),
            dict(entry.get("quality", {})),
        )


@dataclass(frozen=True)
class TextEncoderPart:
    """One tokenizer and text encoder: a `tokenizers` file (padded with `pad_id` and truncated to `max_length`
    by the runtime) and a graph from token ids to the states the denoiser reads (its first output) and, with
    `pooled`, a pooled embedding (its second: SDXL's `text_embeds`). With `attention_mask` (T5) the graph also
    takes the tokens' mask, and the denoiser reads it as `encoder_attention_mask`; with `lowercase` prompts are
    lowercased and stripped first, as PixArt's pipelines do."""

    tokenizer: str
    max_length: int
    pad_id: int
    graph: str
    pooled: bool = False
    attention_mask: bool = False
    lowercase: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, entry: Any, need: _Check) -> TextEncoderPart:
        need(
            isinstance(entry, dict) and need.file(entry.get("tokenizer")) and need.file(entry.get("graph")),
            "'text_to_image.encoders' must name listed files",
        )
        need(
            type(entry.get("max_length")) is int
            and 2 <= entry["max_length"] <= 4096
            and type(entry.get("pad_id")) is int
            and entry["pad_id"] >= 0
            and all(isinstance(entry.get(k, False), bool) for k in ("pooled", "attention_mask", "lowercase")),
            "each of 'text_to_image.encoders' needs a max_length (2..4096), a pad_id, and 'pooled', "
            "'attention_mask' and 'lowercase' true or false",
        )
        flags = {k: entry.get(k, False) for k in ("pooled", "attention_mask", "lowercase")}
        return cls(entry["tokenizer"], entry["max_length"], entry["pad_id"], entry["graph"], **flags)


@dataclass(frozen=True)
class TextToImage:
    """A whole pipeline's other parts: its text encoders (their states concatenated, as SDXL's are), the VAE
    decoder graph, its latent scaling (decoded = vae(latents / scaling_factor + shift_factor)) and how many
    pixels a latent spans per side (`vae_scale_factor`, as diffusers' pipelines compute it); SDXL's
    zeroed negative embeddings when no negative prompt is given; the denoiser inputs the host gives every
    image alike (`fixed_conditions`: SDXL's size/crop `time_ids`, PixArt-alpha's `resolution` and
    `aspect_ratio`); and the export's check of each graph."""

    encoders: tuple[TextEncoderPart, ...]
    vae_decoder: str
    scaling_factor: float
    shift_factor: float = 0.0
    vae_scale_factor: int = 8
    zero_negative: bool = False
    fixed_conditions: dict[str, tuple[float, ...]] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoders": [e.to_dict() for e in self.encoders],
            "vae_decoder": {
                "graph": self.vae_decoder,
                "scaling_factor": self.scaling_factor,
                "shift_factor": self.shift_factor,
                "scale_factor": self.vae_scale_factor,
            },
            "zero_negative": self.zero_negative,
            "fixed_conditions": {k: list(v) for k, v in self.fixed_conditions.items()},
            "checks": self.checks,
        }

    @classmethod
    def from_dict(cls, data: Any, need: _Check) -> TextToImage:
        need(
            isinstance(data, dict)
            and isinstance(data.get("encoders"), list)
            and 1 <= len(data["encoders"]) <= 4
            and isinstance(data.get("vae_decoder"), dict),
            "'text_to_image' needs 1 to 4 'encoders' and a 'vae_decoder'",
        )
        encoders = [TextEncoderPart.from_dict(entry, need) for entry in data["encoders"]]
        vae = data["vae_decoder"]
        need(need.file(vae.get("graph")), "'text_to_image.vae_decoder' must name a listed graph")
        need(
            all(_finite(vae.get(k)) for k in ("scaling_factor", "shift_factor")) and vae["scaling_factor"] > 0,
            "'text_to_image.vae_decoder' needs a positive scaling_factor and a shift_factor",
        )
        scale = vae.get("scale_factor")
        need(
            type(scale) is int and 1 <= scale <= 64 and scale & (scale - 1) == 0,
            "'text_to_image.vae_decoder.scale_factor' must be a power of two from 1 to 64",
        )
        # stepquant 0.4.0 wrote SDXL's ids as 'time_ids', the one fixed condition it knew
        legacy = data.get("time_ids")
        fixed = data.get("fixed_conditions", {} if legacy is None else {"time_ids": legacy})
        need(
            isinstance(fixed, dict)
            and len(fixed) <= 4
            and all(isinstance(v, list) and 1 <= len(v) <= 16 and all(_finite(x) for x in v) for v in fixed.values()),
            "'text_to_image.fixed_conditions' must map a few condition names to a few numbers each",
        )
        need(isinstance(data.get("zero_negative", False), bool), "'text_to_image.zero_negative' must be true or false")
        return cls(
            tuple(encoders),
            vae["graph"],
            float(vae["scaling_factor"]),
            float(vae["shift_factor"]),
            scale,
            data.get("zero_negative", False),
            {str(k): tuple(float(x) for x in v) for k, v in fixed.items()},
            dict(data.get("checks") or {}),
        )


@dataclass(frozen=True)
class Manifest:
    source_model: str
    sample_shape: tuple[int, int, int]
    conditions: tuple[ConditionInput, ...]
    shape_profile: dict[str, Any]  # batch / height / width / sequence ranges (stepquant.export.shapes.ShapeProfile)
    noise_schedule: dict[str, Any]  # the model's scheduler config
    samplers: tuple[StoredSampler, ...]  # the first is the one calibrated for, and the default
    targets: dict[str, Target]
    reference_graph: str  # the FP32 graph
    correction_method: str  # of every sampler's terms
    engine: dict[str, Any]
    sample_space: str = "pixel"
    class_table: str | None = None  # class-conditional models: the class table `sample --classes` picks rows of
    text_to_image: TextToImage | None = None  # a whole pipeline's tokenizer, text encoder and VAE decoder
    denoiser_config: str | None = None  # the denoiser's diffusers config.json (what a diffusers drop-in reports)
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256, every file of the bundle
    info: dict[str, Any] = field(default_factory=dict)  # the rest: quantization, calibration, versions...

    @property
    def sampler(self) -> Sampler:
        """The default sampler: the one the bundle was calibrated and evaluated with."""
        return self.samplers[0].sampler

    def stored(self, key: tuple[str, int, float, bool]) -> StoredSampler | None:
        return next((entry for entry in self.samplers if entry.sampler.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON body (without format version, file list and self-hash, which the writer adds)."""
        return {
            "source_model": self.source_model,
            "sample_shape": list(self.sample_shape),
            "sample_space": self.sample_space,
            "inputs": {
                "conditions": [{"name": c.name, "shape": list(c.shape)} for c in self.conditions],
                "shape_profile": self.shape_profile,
                "class_table": self.class_table,
            },
            "noise_schedule": self.noise_schedule,
            "samplers": [entry.to_dict() for entry in self.samplers],
            "targets": {name: target.to_dict() for name, target in self.targets.items()},
            "reference_graph": self.reference_graph,
            "correction": {"method": self.correction_method},
            "engine": self.engine,
            **({"text_to_image": self.text_to_image.to_dict()} if self.text_to_image else {}),
            **({"denoiser_config": self.denoiser_config} if self.denoiser_config else {}),
            **self.info,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> Manifest:
        """Validate and type a manifest read from JSON; anything missing or mistyped is one BundleError line."""
        check_format_version(data, where)
        files = data.get("files")
        _Check(where, frozenset())(
            isinstance(files, dict) and all(isinstance(v, str) and _SHA256.fullmatch(v) for v in files.values()),
            "'files' must map file names to sha256 digests",
        )
        need = _Check(where, frozenset(files))
        conditions, shape_profile, class_table = _read_inputs(data.get("inputs"), need)
        need(data.get("sample_space") in SAMPLE_SPACES, f"'sample_space' must be one of {', '.join(SAMPLE_SPACES)}")
        need(isinstance(data.get("noise_schedule"), dict), "'noise_schedule' must be a scheduler config")
        entries = data.get("samplers")
        need(
            isinstance(entries, list) and 1 <= len(entries) <= MAX_SAMPLERS,
            f"'samplers' must list 1 to {MAX_SAMPLERS} samplers",
        )
        samplers = tuple(StoredSampler.from_dict(entry, need) for entry in entries)
        need(len({entry.sampler.key for entry in samplers}) == len(samplers), "'samplers' lists a sampler twice")
        need(need.file(data.get("reference_graph")), "'reference_graph' must be a listed file")
        correction = data.get("correction")
        need(isinstance(correction, dict) and isinstance(correction.get("method"), str), "'correction' needs a method")
        need(isinstance(data.get("engine", {}), dict), "'engine' must be an object")
        targets = data.get("targets")
        need(isinstance(targets, dict) and targets, "'targets' must name at least one target")
        text_to_image = (
            None if data.get("text_to_image") is None else TextToImage.from_dict(data["text_to_image"], need)
        )
        need(text_to_image is None or data["sample_space"] == "latent", "'text_to_image' needs latent samples")
        need(
            data.get("denoiser_config") is None or need.file(data["denoiser_config"]),
            "'denoiser_config' must be null or a listed file",
        )
        return cls(
            source_model=str(data.get("source_model", "")),
            sample_shape=_read_sample_shape(data.get("sample_shape"), need),
            conditions=conditions,
            shape_profile=shape_profile,
            noise_schedule=data["noise_schedule"],
            samplers=samplers,
            targets={name: Target.from_dict(section, name, need) for name, section in targets.items()},
            reference_graph=data["reference_graph"],
            correction_method=correction["method"],
            engine=data.get("engine", {}),
            sample_space=data["sample_space"],
            class_table=class_table,
            text_to_image=text_to_image,
            denoiser_config=data.get("denoiser_config"),
            files=dict(files),
            info={k: v for k, v in data.items() if k not in _READ_SECTIONS},
        )


# the sections Manifest.from_dict types; everything else travels in `info`
_READ_SECTIONS = (
    "format_version",
    "files",
    "manifest_sha256",
    "source_model",
    "sample_shape",
    "sample_space",
    "inputs",
    "noise_schedule",
    "samplers",
    "targets",
    "reference_graph",
    "correction",
    "engine",
    "text_to_image",
    "denoiser_config",
)


def _read_sample_shape(shape: Any, need: _Check) -> tuple[int, int, int]:
    need(
        isinstance(shape, list) and len(shape) == 3 and all(type(d) is int and d >= 1 for d in shape),
        "'sample_shape' must be three positive integers",
    )
    need(
        shape[0] * shape[1] * shape[2] <= MAX_SAMPLE_ELEMENTS,
        f"'sample_shape' {shape} is over {MAX_SAMPLE_ELEMENTS:,} values per sample",
    )
    return tuple(shape)  # type: ignore[return-value]


def _read_inputs(inputs: Any, need: _Check) -> tuple[tuple[ConditionInput, ...], dict[str, Any], str | None]:
    """(condition inputs, shape profile, class table) from the 'inputs' section."""
    need(
        isinstance(inputs, dict)
        and isinstance(inputs.get("conditions"), list)
        and isinstance(inputs.get("shape_profile"), dict),
        "'inputs' must hold 'conditions' and 'shape_profile'",
    )
    need(
        all(
            isinstance(r, dict)
            and all(type(r.get(k)) is int and r[k] >= 1 for k in ("min", "opt", "max"))
            and r["min"] <= r["opt"] <= r["max"]
            for r in inputs["shape_profile"].values()
        ),
        "each range of 'inputs.shape_profile' must be positive integers min <= opt <= max",
    )
    need(
        all(
            isinstance(c, dict)
            and isinstance(c.get("name"), str)
            and isinstance(c.get("shape"), list)
            and all(type(d) is int or d == SEQUENCE for d in c["shape"])
            for c in inputs["conditions"]
        ),
        "each of 'inputs.conditions' needs a name and a shape",
    )
    need(
        inputs.get("class_table") is None or (need.file(inputs["class_table"]) and inputs["conditions"]),
        "'inputs.class_table' must be null or a listed file of a conditional model",
    )
    conditions = tuple(ConditionInput(c["name"], tuple(c["shape"])) for c in inputs["conditions"])
    return conditions, inputs["shape_profile"], inputs.get("class_table")
