"""Train the bundled `demo-digits` DDPM on scikit-learn's digits (16x16 grey) and save it as a
diffusers DDPMPipeline directory inside the package. `tools/train_demo_cond.py` trains the class-conditional
`demo-digits-cond` with the same loop.

Deterministic (fixed seeds, deterministic algorithms, 2 threads); about 16 minutes on 2 CPU cores.

    python tools/train_demo.py [--iters 2000] [--out stepquant/models/demo_digits] [--smoke]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from benchdoc import parse_options, scratch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm import tqdm

from stepquant.data.digits import load_digits_16
from stepquant.models.demo_config import SCHEDULER_CONFIG, UNET_CONFIG

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "stepquant" / "models" / "demo_digits"


def cosine_schedule(optimizer: torch.optim.Optimizer, iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of `iters`, then a cosine decay to zero."""
    warmup = max(1, iters // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / iters))
    )


def optimise(
    loss: torch.Tensor, optimizer, schedule, parameters: list, ema: list | None, ema_decay: float, progress
) -> None:
    """One step: gradients clipped to norm 1, the optimiser's and the schedule's steps, the EMA weights' update
    (without `ema`, none), the loss on the progress bar."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()
    if ema is not None:
        with torch.no_grad():
            for p_ema, p in zip(ema, parameters):
                p_ema.lerp_(p, 1.0 - ema_decay)
    progress.set_postfix(loss=f"{loss.item():.4f}")


def train(
    unet: torch.nn.Module,
    iters: int,
    batch_size: int,
    lr: float,
    ema_decay: float,
    seed: int,
    class_table: torch.nn.Parameter | None = None,
    label_dropout: float = 0.0,
    desc: str = "train demo-digits",
) -> tuple[torch.nn.Module, torch.Tensor | None]:
    """Epsilon-prediction training with EMA weights; returns (EMA model, EMA class table). With a
    `class_table` [classes + 1, tokens, dim] the model is conditioned on its row for the digit's label
    through cross-attention, and on the last (null) row with probability `label_dropout`, so one model
    gives both halves of classifier-free guidance."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    images, labels = load_digits_16()
    parameters = list(unet.parameters()) + ([class_table] if class_table is not None else [])
    ema = [p.detach().clone() for p in parameters]
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, iters)
    gen = torch.Generator().manual_seed(seed)
    progress = tqdm(range(iters), desc=desc, unit="it")
    for _ in progress:
        index = torch.randint(0, len(images), (batch_size,), generator=gen)
        x0 = images[index]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        x_t = scheduler.add_noise(x0, noise, t)
        if class_table is None:
            prediction = unet(x_t, t).sample
        else:
            null = len(class_table) - 1
            rows = torch.where(torch.rand(batch_size, generator=gen) < label_dropout, null, labels[index])
            prediction = unet(x_t, t, encoder_hidden_states=class_table[rows]).sample
        optimise(
            torch.nn.functional.mse_loss(prediction, noise), optimizer, schedule, parameters, ema, ema_decay, progress
        )
    with torch.no_grad():
        for p, p_ema in zip(parameters, ema):
            p.copy_(p_ema)
    return unet, None if class_table is None else class_table.detach()


def arguments(doc: str, out: Path, iters: int, batch_size: int, extra=None, **smoke) -> argparse.Namespace:
    """The training options both demos take (`extra` adds a script's own; `smoke`, what --smoke shrinks besides
    the iterations and the output folder)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(parser)
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=out)
    return parse_options(parser, iters=2, out=scratch, **smoke)


def main() -> None:
    args = arguments(__doc__, DEFAULT_OUT, 2000, 128)
    torch.set_num_threads(2)
    start = time.perf_counter()
    unet, _ = train(UNet2DModel(**UNET_CONFIG), args.iters, args.batch_size, args.lr, args.ema_decay, args.seed)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**SCHEDULER_CONFIG)).save_pretrained(args.out)
    print(
        f"saved {args.out} ({sum(p.numel() for p in unet.parameters()):,} parameters) "
        f"in {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
