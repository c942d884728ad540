"""Quality of a whole-pipeline bundle on `demo-digits-sd`'s prompts, the way a device makes its images: one
image per prompt (digit i mod 10, colour pair i mod 30, wording i mod 5, seed i) through the bundle's text
encoder and VAE decoder, with its FP32 reference UNet (FP) and its quantized UNet. Scored by image PSNR to FP,
the Fréchet distance of the digit classifier's features, the requested digit (the classifier on the decoded
digit's mask) and the requested colours (both right)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from stepquant.bundle import Bundle
from stepquant.data.coloured_digits import TEMPLATES, colour_pairs, digit_masks, prompt, read_colours
from stepquant.eval.classifier import load_classifier
from stepquant.eval.metrics import frechet_distance
from stepquant.runtime.sampler import SamplerConfig
from stepquant.runtime.text_to_image import GenerateRequest, generate_batches

CHUNK = 50  # prompts per generate call (one seed each)


def coloured_digit_prompts(count: int, offset: int = 0) -> list[tuple[int, int, int, int]]:
    """(digit, foreground, background, wording) of prompt i = offset + i, cycling through all of them."""
    pairs = colour_pairs()
    return [((i + offset) % 10, *pairs[(i + offset) % len(pairs)], (i + offset) % len(TEMPLATES)) for i in range(count)]


@dataclass
class TextToImageScores:
    prompts: int
    psnr_to_fp_db: float
    fd_to_fp: float
    digit_accuracy: float
    fp_digit_accuracy: float
    colour_accuracy: float
    fp_colour_accuracy: float

    def to_dict(self) -> dict:
        return asdict(self)


def _images(
    bundle: Bundle,
    prompts: list[str],
    graph: str,
    config: SamplerConfig,
    threads: int | None,
    progress: bool,
    **runtime,
) -> torch.Tensor:
    batches = []
    for start in range(0, len(prompts), CHUNK):
        request = GenerateRequest(tuple(prompts[start : start + CHUNK]), seed=start, graph=graph, batch_size=CHUNK // 2)
        batches += list(generate_batches(bundle, request, config, threads, progress=progress, **runtime))
    return torch.from_numpy(np.concatenate(batches))


def judge_coloured_digits(
    images: torch.Tensor, asked: list[tuple[int, int, int, int]]
) -> tuple[float, float, torch.Tensor]:
    """(requested-digit accuracy, requested-colours accuracy, the digit classifier's features) of RGB images
    [N, 3, 32, 32] in [-1, 1] asked for by `asked` (coloured_digit_prompts)."""
    classifier = load_classifier()
    masks = digit_masks(images)
    with torch.no_grad():
        digits, features = classifier(masks).argmax(1), classifier.features(masks)
    fg, bg = read_colours(images)
    truth = torch.tensor(asked)
    return (
        float((digits == truth[:, 0]).float().mean()),
        float(((fg == truth[:, 1]) & (bg == truth[:, 2])).float().mean()),
        features,
    )


def reference_images(
    bundle: Bundle, count: int, config: SamplerConfig, threads: int | None = None, progress: bool = False
) -> torch.Tensor:
    """The FP images the scores compare with: the bundle's FP32 reference UNet on the first `count` prompts."""
    return _images(bundle, [prompt(*a) for a in coloured_digit_prompts(count)], "reference", config, threads, progress)


def score_coloured_digits(
    bundle: Bundle,
    count: int,
    config: SamplerConfig,
    threads: int | None = None,
    progress: bool = False,
    fp: torch.Tensor | None = None,
    **runtime,
) -> TextToImageScores:
    """The module docstring's scores over `count` prompts, against `fp` (reference_images of a bundle with the
    same reference graph; default: this bundle's); `runtime` (backend, engine, corrections) goes to the
    quantized run."""
    asked = coloured_digit_prompts(count)
    if fp is None:
        fp = reference_images(bundle, count, config, threads, progress)
    quantized = _images(bundle, [prompt(*a) for a in asked], "quantized", config, threads, progress, **runtime)
    broken = int((~torch.isfinite(quantized).flatten(1).all(1)).sum())
    if broken:
        raise ValueError(
            f"{broken} of {count} quantized images hold NaN or inf ({config.describe()}, guidance "
            f"{config.guidance_scale:g}): the quantized UNet overflows along these trajectories"
        )
    fp_digit, fp_colour, fp_features = judge_coloured_digits(fp, asked)
    digit, colour, features = judge_coloured_digits(quantized, asked)
    psnr = 10 * torch.log10(4.0 / ((quantized - fp) ** 2).flatten(1).mean(1).clamp_min(1e-12)).mean()
    return TextToImageScores(
        count, float(psnr), frechet_distance(features, fp_features), digit, fp_digit, colour, fp_colour
    )
