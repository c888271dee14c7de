"""Reading and transforming (image, label) pairs for the dataset readers (ADE20K, driving scenes,
COCO-20i). Transforms are `transform(image [3, H, W], label [H, W], generator) -> (image, label)`,
drawing all randomness from the generator so an item depends only on its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

IGNORE_INDEX = 255
Transform = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator for item `index` in `epoch`: the same in any DataLoader worker or rank and
    after a resume, different across epochs."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]))


def read_image(path: Path) -> Tensor:
    """An image file -> [3, H, W] float32 in [-1, 1] (RGB, the SD/VAE convention)."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1


def _check_multiple_of_8(size: tuple[int, int], name: str) -> None:
    if len(size) != 2 or min(size) < 8 or size[0] % 8 or size[1] % 8:
        raise ValueError(f"{name} must be (height, width), each a positive multiple of 8 (the VAE factor), got {size}")


def _resize(image: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Bilinear (antialiased) for the image, nearest for the label."""
    image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image.clamp(-1, 1), label


@dataclass(frozen=True)
class RandomResizeCropFlip:
    """mmseg's ADE20K training pipeline without photometric distortion and category-ratio retries:
    resize to fit `scale` (long, short side) times a ratio drawn uniformly from `ratio_range`,
    keeping the aspect; crop `crop` (H, W) at a random place, padding with 0 (mid grey) and 255
    (ignore) where the image is smaller; flip left-right with probability 1/2."""

    crop: tuple[int, int] = (512, 512)
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)

    def __post_init__(self):
        _check_multiple_of_8(self.crop, "crop")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {self.ratio_range}")

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """image [3, H, W], label [H, W] -> image [3, *crop], label [*crop]."""
        lo, hi = self.ratio_range
        ratio = lo + (hi - lo) * torch.rand((), generator=generator).item()
        h, w = image.shape[1:]
        factor = ratio * min(max(self.scale) / max(h, w), min(self.scale) / min(h, w))
        image, label = _resize(image, label, (max(1, round(h * factor)), max(1, round(w * factor))))
        ch, cw = self.crop
        pad_h, pad_w = max(ch - image.shape[1], 0), max(cw - image.shape[2], 0)
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = torch.randint(image.shape[1] - ch + 1, (), generator=generator).item()
        left = torch.randint(image.shape[2] - cw + 1, (), generator=generator).item()
        image, label = image[:, top : top + ch, left : left + cw], label[top : top + ch, left : left + cw]
        if torch.rand((), generator=generator).item() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image.contiguous(), label.contiguous()


@dataclass(frozen=True)
class ResizeImage:
    """Evaluation: resize the image to fit `scale` (long, short side) keeping the aspect, each side
    rounded to a multiple of 8; the label keeps the annotation's size, so predictions are resized
    back to it before scoring (mmseg's protocol). Draws nothing from the generator."""

    scale: tuple[int, int] = (2048, 512)

    def __post_init__(self):
        _check_multiple_of_8(self.scale, "scale")

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """image [3, H, W], label [H, W] -> image [3, 8·i, 8·j], label [H, W] unchanged."""
        h, w = image.shape[1:]
        factor = min(max(self.scale) / max(h, w), min(self.scale) / min(h, w))
        size = (max(8, round(h * factor / 8) * 8), max(8, round(w * factor / 8) * 8))
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        return image.clamp(-1, 1), label
