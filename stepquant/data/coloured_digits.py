"""scikit-learn's digits drawn in colour on coloured backgrounds (32x32 RGB in [-1, 1]), the prompts that name
them, and the reverse: which colours and which digit an image shows. `demo-digits-sd` is trained on these
images and prompts, and its samples are judged by `read_colours` and the project's digit classifier
(`digit_masks` turns a coloured image back into the 16x16 grey digit the classifier reads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stepquant.data.digits import load_digits_16

IMAGE_SIZE = 32
PALETTE = {  # name -> RGB in [-1, 1]
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (-1.0, -1.0, -1.0),
}
COLOURS = tuple(PALETTE)
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a {fg} {word} on a {bg} background",
    "the digit {digit} in {fg}, {bg} paper",
    "{fg} number {word} over {bg}",
    "a {word} painted {fg} on {bg}",
    "digit {digit}, {fg} on {bg}",
)


def _palette() -> torch.Tensor:
    """The palette's colours [len(COLOURS), 3], indexed like COLOURS."""
    return torch.tensor(list(PALETTE.values()))


def prompt(digit: int, fg: int, bg: int, template: int = 0) -> str:
    return TEMPLATES[template % len(TEMPLATES)].format(fg=COLOURS[fg], bg=COLOURS[bg], word=WORDS[digit], digit=digit)


def colour_pairs() -> list[tuple[int, int]]:
    """Every (foreground, background) pair of distinct palette colours."""
    return [(f, b) for f in range(len(COLOURS)) for b in range(len(COLOURS)) if f != b]


def render(grey: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Grey digits [N, 1, 16, 16] in [-1, 1] drawn with palette colours `fg` over `bg` (indices [N]) at 32x32."""
    mask = F.interpolate((grey + 1) / 2, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(
        0, 1
    )
    palette = _palette()
    return palette[bg][:, :, None, None] * (1 - mask) + palette[fg][:, :, None, None] * mask


def load_coloured_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grey digits [N, 1, 16, 16], labels [N], every colour pair [P, 2]); colours are drawn per training batch."""
    grey, labels = load_digits_16()
    return grey, labels, torch.tensor(colour_pairs())


def read_colours(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground, background) palette indices of RGB images [N, 3, H, W] in [-1, 1]: the background is the
    border's mean colour, the foreground the mean of the tenth of pixels farthest from it."""
    palette = _palette()
    border = torch.cat(
        [
            images[:, :, :2].flatten(2),
            images[:, :, -2:].flatten(2),
            images[:, :, :, :2].flatten(2),
            images[:, :, :, -2:].flatten(2),
        ],
        dim=2,
    ).mean(2)
    pixels = images.flatten(2)
    distance = (pixels - border[:, :, None]).norm(dim=1)
    top = distance.topk(max(1, pixels.shape[2] // 10), dim=1).indices
    fg = torch.stack([pixels[i, :, top[i]].mean(1) for i in range(len(images))])
    nearest = lambda colours: torch.cdist(colours, palette).argmin(1)  # noqa: E731
    return nearest(fg), nearest(border)


def digit_masks(images: torch.Tensor) -> torch.Tensor:
    """RGB digits [N, 3, 32, 32] -> grey [N, 1, 16, 16] in [-1, 1] (the digit's strokes white on black), for the
    digit classifier: each pixel's position between the background and the foreground colour."""
    fg, bg = read_colours(images)
    palette = _palette()
    axis = (palette[fg] - palette[bg])[:, :, None, None]
    # an image whose two colours read alike has no strokes to tell apart: an empty mask, not 0 / 0
    spread = (axis * axis).sum(1, keepdim=True).clamp_min(1e-12)
    mask = ((images - palette[bg][:, :, None, None]) * axis).sum(1, keepdim=True) / spread
    return F.avg_pool2d(mask.clamp(0, 1), 2) * 2 - 1
