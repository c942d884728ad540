"""The project's digit classifier: its penultimate features give the Fréchet distance (our stand-in
for FID, whose Inception weights cannot be downloaded here) and its predictions say whether a
generated sample is a recognisable digit. Weights ship with the package (tools/train_classifier.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "digit_classifier.safetensors"
FEATURES = 64


class DigitClassifier(nn.Module):
    """A small CNN on 16x16 grey digits in [-1, 1]: two conv stages, a 64-d feature layer, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, FEATURES),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: Path = WEIGHTS) -> DigitClassifier:
    if not path.is_file():
        raise FileNotFoundError(f"digit classifier weights not found at {path}; run tools/train_classifier.py")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
