"""Train the bundled `demo-digits` DDPM on scikit-learn's digits (16x16 grey) and save it as a
diffusers DDPMPipeline directory inside the package.

Deterministic (fixed seeds, deterministic algorithms, 2 threads); about 16 minutes on 2 CPU cores.

    python tools/train_demo.py [--iters 2000] [--out stepquant/models/demo_digits]
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm import tqdm

from stepquant.data.digits import load_digits_16
from stepquant.models.demo_config import SCHEDULER_CONFIG, UNET_CONFIG

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "stepquant" / "models" / "demo_digits"


def train(iters: int, batch_size: int, lr: float, ema_decay: float, seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    images, _ = load_digits_16()
    unet = UNet2DModel(**UNET_CONFIG)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, iters // 20)
    lr_at = lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / iters))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    gen = torch.Generator().manual_seed(seed)
    progress = tqdm(range(iters), desc="train demo-digits", unit="it")
    for _ in progress:
        x0 = images[torch.randint(0, len(images), (batch_size,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1.0 - ema_decay)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    return ema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    unet = train(args.iters, args.batch_size, args.lr, args.ema_decay, args.seed)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**SCHEDULER_CONFIG)).save_pretrained(args.out)
    print(f"saved {args.out} ({sum(p.numel() for p in unet.parameters()):,} parameters) "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
