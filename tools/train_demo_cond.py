"""Train the bundled class-conditional `demo-digits-cond` on scikit-learn's digits (16x16 grey): a diffusers
UNet2DConditionModel whose cross-attention reads a learned class table (ten digits and a null class, with
label dropout for classifier-free guidance), saved as a pipeline-style directory inside the package:
unet/, scheduler/ and the class table in class_embeddings/ (a conditioning file: one row per digit, the
null row as its unconditional input).

Deterministic (fixed seeds, deterministic algorithms, 2 threads); under 30 minutes on 2 CPU cores. Ends by
sampling guided FP digits and printing how often the project's classifier reads the requested digit.

    python tools/train_demo_cond.py [--iters 3000] [--out stepquant/models/demo_digits_cond] [--final-check 200]
        [--smoke]
    python tools/train_demo_cond.py --check 0,1,1.5,2,3,6      (the shipped model's accuracy by guidance)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from train_demo import arguments, train

from stepquant.eval.classifier import load_classifier
from stepquant.models import EpsilonModel
from stepquant.models.demo_config import CLASS_TOKENS, COND_SCHEDULER_CONFIG, COND_UNET_CONFIG, CROSS_ATTENTION_DIM
from stepquant.models.loading import CLASS_TABLE_FILE
from stepquant.models.schedulers import capture_table
from stepquant.models.torch_backend import TorchBackend
from stepquant.runtime.guidance import Conditioning
from stepquant.runtime.sampler import SamplerConfig, sample

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "stepquant" / "models" / "demo_digits_cond"
DIGITS = 10
LABEL_DROPOUT = 0.15


def save(out: Path, unet: UNet2DConditionModel, table: torch.Tensor) -> Conditioning:
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    DDPMScheduler(**COND_SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    classes = Conditioning(
        {"encoder_hidden_states": table[:DIGITS].numpy()}, {"encoder_hidden_states": table[DIGITS:].numpy()}
    )
    (out / CLASS_TABLE_FILE).parent.mkdir(exist_ok=True)
    classes.save(out / CLASS_TABLE_FILE)
    index = {
        "_class_name": "ClassConditionalDDPM",
        "_diffusers_version": unet.config["_diffusers_version"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return classes


def guided_accuracy(
    unet: UNet2DConditionModel,
    classes: Conditioning,
    count: int = 200,
    guidance: float = 3.0,
    schedule: dict = COND_SCHEDULER_CONFIG,
) -> float:
    """Share of guided FP samples (25 DDIM steps, seed i asking for digit i mod 10) the digit classifier reads
    as the requested digit."""
    config = SamplerConfig("ddim", 25, 0.0, guidance)
    seeds = range(count)
    rows = classes.select([s % DIGITS for s in seeds])
    samples = sample(
        TorchBackend(EpsilonModel(unet.eval())),
        capture_table(config, schedule),
        seeds,
        (1, 16, 16),
        config,
        conditioning=rows,
        progress=False,
    ).samples
    with torch.no_grad():
        predicted = load_classifier()(torch.from_numpy(samples)).argmax(1).numpy()
    return float((predicted == np.arange(count) % DIGITS).mean())


def check(out: Path, guidances: list[float], count: int) -> None:
    """The saved model's guided accuracy per guidance scale, with its scheduler and with x0 clipping."""
    unet = UNet2DConditionModel.from_pretrained(out / "unet").requires_grad_(False)
    classes = Conditioning.load(out / CLASS_TABLE_FILE)
    for clip in (False, True):
        schedule = {**COND_SCHEDULER_CONFIG, "clip_sample": clip}
        scores = ", ".join(f"{g:g}: {guided_accuracy(unet, classes, count, g, schedule):.2f}" for g in guidances)
        print(f"clip_sample {clip}, {count} seeds, accuracy by guidance scale: {scores}")


def main() -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--check", help="only measure the saved model's guided accuracy at these guidance scales, e.g. 0,1,3"
        )
        parser.add_argument(
            "--final-check", type=int, default=200, help="seeds of the guided accuracy measured after training"
        )

    args = arguments(__doc__, DEFAULT_OUT, 3000, 64, extra=extra, final_check=2)
    torch.set_num_threads(2)
    if args.check:
        check(args.out, [float(g) for g in args.check.split(",")], 100)
        return
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**COND_UNET_CONFIG)
    table = torch.nn.Parameter(torch.randn(DIGITS + 1, CLASS_TOKENS, CROSS_ATTENTION_DIM))
    unet, table = train(
        unet,
        args.iters,
        args.batch_size,
        args.lr,
        args.ema_decay,
        args.seed,
        table,
        LABEL_DROPOUT,
        desc="train demo-digits-cond",
    )
    classes = save(args.out, unet, table)
    print(
        f"saved {args.out} ({sum(p.numel() for p in unet.parameters()):,} parameters) "
        f"in {time.perf_counter() - start:.0f} s"
    )
    print(
        f"guided FP samples (guidance 3, 25 DDIM steps, {args.final_check} seeds) read as the requested digit: "
        f"{guided_accuracy(unet, classes, args.final_check):.1%}"
    )


if __name__ == "__main__":
    main()
