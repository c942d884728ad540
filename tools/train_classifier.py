"""Train the evaluation digit classifier on scikit-learn's digits (the demo model's preprocessing),
report its held-out accuracy, and save its weights inside the package.

Deterministic; under a minute on 2 CPU cores.

    python tools/train_classifier.py [--epochs 30] [--out FILE] [--smoke]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from benchdoc import parse_options, scratch
from safetensors.torch import save_file

from stepquant.data.digits import held_out_split, load_digits_16
from stepquant.eval.classifier import WEIGHTS, DigitClassifier


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel and mild noise: generated digits are never pixel-perfect."""
    shifts = torch.randint(-1, 2, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    return (x + 0.1 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="where the weights go (default: the package's)")
    args = parse_options(parser, epochs=1, out=lambda: scratch() / "classifier.safetensors")
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    images, labels = load_digits_16()
    train, test = held_out_split(len(images), args.held_out, args.seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        model.train()
        for batch in train[torch.randperm(len(train), generator=generator)].split(64):
            loss = F.cross_entropy(model(augment(images[batch], generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    save_file(
        model.state_dict(),
        str(args.out),
        metadata={
            "held_out_accuracy": f"{accuracy:.4f}",
            "held_out_count": str(len(test)),
            "seed": str(args.seed),
            "config": json.dumps({k: v for k, v in vars(args).items() if k in ("epochs", "held_out", "seed")}),
        },
    )
    print(f"held-out accuracy {accuracy:.4f} on {len(test)} digits; saved {args.out}")


if __name__ == "__main__":
    main()
