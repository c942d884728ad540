"""Evaluate a quantized backend against the FP one from the same noise: final-sample metrics and the
per-step against accumulated error along the sampling trajectory.

- per-step error: RMS of eps_q(x_t) - eps_fp(x_t) on the FP trajectory's inputs (the network's own error);
- accumulated error: RMS of x_t(quantized trajectory) - x_t(FP trajectory) after each step.

Batches are processed one at a time and only sums are kept, so memory does not grow with the sample count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from stepquant.data.digits import load_digits_16
from stepquant.eval.classifier import DigitClassifier, load_classifier
from stepquant.eval.metrics import frechet_distance, psnr, rms
from stepquant.models.schedulers import capture_table
from stepquant.runtime.backend import Backend
from stepquant.runtime.corrections import Corrections
from stepquant.runtime.guidance import Conditioning, combine_guided
from stepquant.runtime.sampler import SamplerConfig, sample

RECOGNISABLE_CONFIDENCE = 0.9


@dataclass
class Evaluation:
    samples: int
    psnr_to_fp_db: float
    psnr_to_fp_db_min: float
    fd_to_fp: float
    fd_to_data: float
    fp_fd_to_data: float
    label_agreement: float  # fraction whose predicted digit equals that of the FP sample from the same seed
    confidence: float
    fp_confidence: float
    recognisable: float  # fraction classified with confidence >= RECOGNISABLE_CONFIDENCE
    fp_recognisable: float
    class_accuracy: float | None = None  # class-conditional: fraction classified as the requested digit
    fp_class_accuracy: float | None = None
    timesteps: list[int] = field(default_factory=list)
    step_error: list[float] = field(default_factory=list)
    accumulated_error: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _StepErrorMeter:
    """Wraps the FP backend: also runs the quantized backend on the same inputs and sums the RMS error of the
    estimate the sampler steps with (with guidance: of the guided combination of the two halves)."""

    def __init__(self, fp: Backend, quantized: Backend, steps: int, guidance_scale: float | None) -> None:
        self.fp, self.quantized, self.guidance_scale = fp, quantized, guidance_scale
        self.sums = np.zeros(steps)
        self.step = 0

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditions: np.ndarray) -> np.ndarray:
        eps = self.fp(sample, timestep, **conditions)
        estimate = self.quantized(sample, timestep, **conditions)
        pair = (eps, estimate)
        if self.guidance_scale is not None:
            pair = tuple(combine_guided(*np.split(e, 2), self.guidance_scale) for e in pair)
        self.sums[self.step % len(self.sums)] += float(rms(pair[1], pair[0]).sum())
        self.step += 1
        return eps


def _states(
    backend: Backend,
    schedule: dict,
    seeds: Sequence[int],
    shape,
    config: SamplerConfig,
    corrections: Corrections | None = None,
    conditioning: Conditioning | None = None,
):
    """Final samples and the x_t after every step (the inputs of steps 1.. plus the final sample)."""
    inputs: list[np.ndarray] = []
    final = sample(
        backend,
        capture_table(config, schedule),
        seeds,
        shape,
        config,
        batch_size=len(seeds),
        progress=False,
        on_step=lambda index, t, x: inputs.append(x.copy()),
        corrections=corrections,
        conditioning=conditioning,
    ).samples
    return final, inputs[1:]


def _classify(classifier: DigitClassifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        features = classifier.features(images)
        return features, classifier.head(features).softmax(dim=1)


def evaluate(
    fp: Backend,
    quantized: Backend,
    noise_schedule: dict,
    seeds: Sequence[int],
    sample_shape: tuple[int, int, int],
    config: SamplerConfig = SamplerConfig(),
    batch_size: int = 128,
    progress: bool = True,
    corrections: Corrections | None = None,
    conditioning: Conditioning | None = None,
    requested: Sequence[int] | None = None,
) -> Evaluation:
    """Compare `quantized` (with its host-side `corrections`, if any) to `fp` from the same seeds. The
    per-step error is the raw network error on FP inputs; corrections act on the trajectories. Conditional
    models take `conditioning` (sample i its row i mod P, guided by `config`); with `requested`, the digit
    each sample asks for, the class accuracy of both is reported too."""
    seeds = list(seeds)
    guided = conditioning is not None and config.guidance_scale != 1.0
    meter = _StepErrorMeter(fp, quantized, config.steps, config.guidance_scale if guided else None)
    accumulated = np.zeros(config.steps)
    fp_final, q_final = [], []
    for start in tqdm(
        range(0, len(seeds), batch_size), desc="evaluating", unit="batch", disable=not progress, leave=False
    ):
        batch = seeds[start : start + batch_size]
        rows = None if conditioning is None else conditioning.at(range(start, start + len(batch)))
        fp_samples, fp_states = _states(meter, noise_schedule, batch, sample_shape, config, conditioning=rows)
        q_samples, q_states = _states(quantized, noise_schedule, batch, sample_shape, config, corrections, rows)
        # after the last step the returned (clipped) samples are compared
        for index, (a, b) in enumerate(zip(q_states + [q_samples], fp_states + [fp_samples])):
            accumulated[index] += float(rms(a, b).sum())
        fp_final.append(fp_samples)
        q_final.append(q_samples)
    fp_all, q_all = torch.from_numpy(np.concatenate(fp_final)), torch.from_numpy(np.concatenate(q_final))
    classifier = load_classifier()
    data_features, _ = _classify(classifier, load_digits_16()[0])
    fp_features, fp_probs = _classify(classifier, fp_all)
    q_features, q_probs = _classify(classifier, q_all)
    scores = psnr(q_all, fp_all)
    n = len(seeds)
    accuracy = {}
    if requested is not None:
        labels = torch.as_tensor(list(requested))
        accuracy = {
            "class_accuracy": float((q_probs.argmax(1) == labels).float().mean()),
            "fp_class_accuracy": float((fp_probs.argmax(1) == labels).float().mean()),
        }
    return Evaluation(
        samples=n,
        psnr_to_fp_db=float(scores.mean()),
        psnr_to_fp_db_min=float(scores.min()),
        fd_to_fp=frechet_distance(q_features, fp_features),
        fd_to_data=frechet_distance(q_features, data_features),
        fp_fd_to_data=frechet_distance(fp_features, data_features),
        label_agreement=float((q_probs.argmax(1) == fp_probs.argmax(1)).float().mean()),
        confidence=float(q_probs.max(1).values.mean()),
        fp_confidence=float(fp_probs.max(1).values.mean()),
        recognisable=float((q_probs.max(1).values >= RECOGNISABLE_CONFIDENCE).float().mean()),
        fp_recognisable=float((fp_probs.max(1).values >= RECOGNISABLE_CONFIDENCE).float().mean()),
        timesteps=[int(t) for t in capture_table(config, noise_schedule).timesteps],
        step_error=(meter.sums / n).tolist(),
        accumulated_error=(accumulated / n).tolist(),
        **accuracy,
    )
