"""Conditioning for conditional denoisers and classifier-free guidance in the host loop.

A `Conditioning` holds one row per prompt (or class: a class-conditional model's class table is a
conditioning file whose row k is class k) for every condition input of the model, and the
unconditional ("null") rows the guidance contrasts them with. Sample i of a run uses prompt i mod P, so
FP and quantized runs from the same seeds see the same prompts. With a guidance scale g != 1 the network
runs once per step on [unconditional half; conditional half] and the host combines
eps = eps_u + g (eps_c - eps_u), as diffusers' pipelines do.

Files are safetensors with the condition names as keys and `uncond.<name>` for the null rows (one row, or
one per prompt); `stepquant encode-prompts` writes them from a pipeline's own text encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from stepquant.bundle.manifest import SEQUENCE, ConditionInput
from stepquant.runtime.backend import Backend

UNCOND_PREFIX = "uncond."


class ConditioningError(ValueError):
    """Conditioning that does not fit the model (missing input, wrong shape) or an unreadable file."""


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line (a prompts file, for export's calibration and for `generate`)."""
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConditioningError(f"cannot read prompts from {path}: {err}") from err
    if not prompts:
        raise ConditioningError(f"{path} holds no prompts (one per line)")
    return prompts


@dataclass
class Conditioning:
    cond: dict[str, np.ndarray]  # name -> [P, ...] float32
    uncond: dict[str, np.ndarray]  # name -> [1 or P, ...]

    def __post_init__(self) -> None:
        self.cond = {k: np.asarray(v, dtype=np.float32) for k, v in self.cond.items()}
        self.uncond = {k: np.asarray(v, dtype=np.float32) for k, v in self.uncond.items()}
        if not self.cond:
            raise ConditioningError("conditioning holds no inputs")
        if set(self.cond) != set(self.uncond):
            raise ConditioningError(
                f"conditional inputs {sorted(self.cond)} and unconditional inputs {sorted(self.uncond)} differ"
            )
        counts = {len(v) for v in self.cond.values()}
        if len(counts) != 1:
            raise ConditioningError(f"condition inputs disagree on the number of prompts: {sorted(counts)}")
        for name, rows in self.uncond.items():
            if len(rows) not in (1, len(self)) or rows.shape[1:] != self.cond[name].shape[1:]:
                raise ConditioningError(
                    f"unconditional {name} has shape {tuple(rows.shape)}; expected 1 or "
                    f"{len(self)} rows of {tuple(self.cond[name].shape[1:])}"
                )
            if not (np.isfinite(rows).all() and np.isfinite(self.cond[name]).all()):
                raise ConditioningError(f"condition input {name} holds NaN or infinite values")

    def __len__(self) -> int:
        return len(next(iter(self.cond.values())))

    def rows(self, indices: Sequence[int], unconditional: bool = False) -> dict[str, np.ndarray]:
        """The rows for sample positions `indices` (prompt i mod P)."""
        source = self.uncond if unconditional else self.cond
        return {name: t[np.array([i % len(t) for i in indices], dtype=np.int64)] for name, t in source.items()}

    def at(self, indices: Sequence[int]) -> Conditioning:
        """The rows of sample positions `indices`, as positions 0.. of a new conditioning (for one batch of a run)."""
        return Conditioning(self.rows(indices), self.rows(indices, unconditional=True))

    def select(self, classes: Sequence[int]) -> Conditioning:
        """A class table's rows for `classes` (row k is class k; the null rows stay the unconditional input)."""
        if not classes:
            raise ConditioningError("--classes names no class")
        bad = [c for c in classes if not 0 <= c < len(self)]
        if bad:
            raise ConditioningError(
                f"class {bad[0]} is out of range: the model's class table has {len(self)} classes (0-{len(self) - 1})"
            )
        index = np.asarray(classes, dtype=np.int64)
        return Conditioning({k: v[index] for k, v in self.cond.items()}, dict(self.uncond))

    def for_inputs(self, inputs: Sequence[ConditionInput]) -> Conditioning:
        """This conditioning in the model's input order; refused unless it holds exactly those inputs, each
        with the model's shape (any length on a text axis)."""
        names = [c.name for c in inputs]
        if set(names) != set(self.cond):
            raise ConditioningError(
                f"the model takes condition inputs {names}, the conditioning holds {sorted(self.cond)}"
            )
        for condition in inputs:
            rows = self.cond[condition.name]
            if rows.ndim != 1 + len(condition.shape) or any(
                d != SEQUENCE and d != found for d, found in zip(condition.shape, rows.shape[1:])
            ):
                raise ConditioningError(
                    f"condition {condition.name} has shape {tuple(rows.shape)}; the model takes "
                    f"[prompts, {', '.join(map(str, condition.shape))}]"
                )
        return Conditioning({n: self.cond[n] for n in names}, {n: self.uncond[n] for n in names})

    def sequence_length(self, inputs: Sequence[ConditionInput]) -> int | None:
        """The text length of the first input with a text axis (None without one)."""
        for condition in inputs:
            if SEQUENCE in condition.shape:
                return self.cond[condition.name].shape[1 + condition.shape.index(SEQUENCE)]
        return None

    def save(self, path: str | Path) -> None:
        tensors = {**self.cond, **{UNCOND_PREFIX + k: v for k, v in self.uncond.items()}}
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> Conditioning:
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ConditioningError(f"cannot read conditioning {path}: {err}") from err
        cond = {k: v for k, v in tensors.items() if not k.startswith(UNCOND_PREFIX)}
        uncond = {k[len(UNCOND_PREFIX) :]: v for k, v in tensors.items() if k.startswith(UNCOND_PREFIX)}
        return cls(cond, uncond)


def choose_conditioning(
    inputs: Sequence[ConditionInput],
    where: str,
    conditioning_file: Path | None = None,
    classes: Sequence[int] | None = None,
    class_table: Path | None = None,
    prompts: Callable[[], Conditioning] | None = None,
    missing: str = "pass --conditioning",
) -> Conditioning | None:
    """The conditioning a command was given for the model `where` taking `inputs`, in their order: a file, a
    class table's rows (`classes`; every class in turn when the model has a table and nothing else is given)
    or encoded prompts; None for an unconditional model. One line when it is missing, superfluous, doubled or
    does not fit."""
    given = [
        flag
        for flag, value in (("--prompts-file", prompts), ("--conditioning", conditioning_file), ("--classes", classes))
        if value is not None
    ]
    if len(given) > 1:
        raise ConditioningError(f"give one of --prompts-file, --conditioning and --classes, not {' and '.join(given)}")
    if not inputs:
        if given:
            raise ConditioningError(f"{where} is unconditional: drop {given[0]}")
        return None
    if conditioning_file is not None:
        conditioning = Conditioning.load(conditioning_file)
    elif prompts is not None:
        conditioning = prompts()
    elif class_table is not None:
        table = Conditioning.load(class_table)
        conditioning = table.select(list(range(len(table))) if classes is None else classes)
    elif classes is not None:
        raise ConditioningError(
            f"{where} has no class table: --classes is for class-conditional models "
            "(demo-digits-cond); condition this one with --conditioning or --prompts-file"
        )
    else:
        raise ConditioningError(f"{where} is conditioned on {', '.join(c.name for c in inputs)}: {missing}")
    return conditioning.for_inputs(inputs)


def guided_estimate(
    backend: Backend,
    x: np.ndarray,
    timesteps: np.ndarray,
    conditioning: Conditioning | None,
    indices: Sequence[int],
    guidance_scale: float,
) -> np.ndarray:
    """The noise estimate the scheduler steps with: unconditional models get `backend(x, t)`; conditional
    ones their prompts' rows, guided when `guidance_scale` != 1 (both halves in one batch)."""
    if conditioning is None:
        return backend(x, timesteps)
    if guidance_scale == 1.0:
        return backend(x, timesteps, **conditioning.rows(indices))
    uncond, cond = conditioning.rows(indices, unconditional=True), conditioning.rows(indices)
    inputs = {name: np.concatenate([uncond[name], cond[name]]) for name in cond}
    eps_uncond, eps_cond = np.split(
        backend(np.concatenate([x, x]), np.concatenate([timesteps, timesteps]), **inputs), 2
    )
    return combine_guided(eps_uncond, eps_cond, guidance_scale)


def combine_guided(eps_uncond, eps_cond, guidance_scale: float):
    """Classifier-free guidance: eps_u + g (eps_c - eps_u) (numpy arrays or torch tensors)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
