"""ADE20K-150 (the SceneParsing benchmark, ADEChallengeData2016) for semantic segmentation.

    ds = ADE20K(root, "training", transform=RandomResizeCropFlip(crop=(512, 512)))
    ds.set_epoch(epoch)                        # beside loader.sampler.set_epoch(epoch)
    item = ds[i]   # image [3, H, W] float32 in [-1, 1], label [H, W] int64 in {0..149, 255}, path str

Layout, as distributed (ADEChallengeData2016.zip: 20210 training, 2000 validation images):

    root/images/{training,validation}/ADE_*.jpg
    root/annotations/{training,validation}/ADE_*.png    8-bit, 0 = other, 1..150 = ADE20K_CLASSES

Labels are reduced as mmseg's `reduce_zero_label=True`: 0 ("other", not evaluated) -> 255, the
classes 1..150 -> 0..149. Augmentations draw from a generator seeded by (seed, epoch, index), so
that an item is the same in any worker and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IGNORE_INDEX = 255
SPLITS = ("training", "validation")

# The 150 classes in label order (label k + 1 in the PNGs, k after reduction), as in mmseg's
# `ADE20KDataset.METAINFO["classes"]` (mmseg/datasets/ade.py), with the trailing space of 'bed ' dropped.
# Ten to a row: row r holds classes 10·r .. 10·r + 9.
# fmt: off
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# fmt: on

Transform = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]


def reduce_zero_label(label: Tensor) -> Tensor:
    """Raw ADE20K label [H, W] (uint8, 0 = other, 1..150) -> int64 [H, W]: 0 -> 255, k -> k - 1."""
    label = label.long()
    if label.numel():
        lo, hi = (int(v) for v in label.aminmax())
        if lo < 0 or hi > len(ADE20K_CLASSES):
            raise ValueError(f"raw ADE20K labels must lie in 0..{len(ADE20K_CLASSES)}, got values in {lo}..{hi}")
    return torch.where(label == 0, IGNORE_INDEX, label - 1)


def read_image(path: Path) -> Tensor:
    """An image file -> [3, H, W] float32 in [-1, 1] (RGB, the SD/VAE convention)."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 127.5 - 1


def read_label(path: Path) -> Tensor:
    """An ADE20K annotation PNG -> reduced label [H, W] int64 in {0..149, 255}."""
    with Image.open(path) as img:
        raw = np.asarray(img)
    if raw.ndim != 2:
        raise ValueError(f"{path}: annotations must be single-channel 8-bit PNGs, got array shape {raw.shape}")
    try:
        return reduce_zero_label(torch.from_numpy(raw.astype(np.int64)))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


class ADE20K(Dataset):
    """Items: dict(image [3, H, W] float32 in [-1, 1], label [H, W] int64 (0..149, 255 = ignore),
    path str of the image). Without a transform, sizes are the files' own (they vary)."""

    def __init__(
        self, root: Union[str, Path], split: str = "training", transform: Optional[Transform] = None, seed: int = 0
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        root = Path(root)
        images_dir, labels_dir = root / "images" / split, root / "annotations" / split
        layout = f"{root}/images/{split}/*.jpg with {root}/annotations/{split}/*.png of the same names"
        for d in (images_dir, labels_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"{d} is not a directory; expected the ADEChallengeData2016 layout: {layout}")
        images = sorted(images_dir.glob("*.jpg"))
        labels = sorted(labels_dir.glob("*.png"))
        if not images:
            raise FileNotFoundError(f"no .jpg images in {images_dir}; expected {layout}")
        unlabelled = sorted({p.stem for p in images} - {p.stem for p in labels})
        unmatched = sorted({p.stem for p in labels} - {p.stem for p in images})
        if unlabelled or unmatched:
            raise FileNotFoundError(
                f"images and annotations of {split} do not pair up ({layout}): {len(unlabelled)} images lack an "
                f"annotation (e.g. {unlabelled[:3]}), {len(unmatched)} annotations lack an image (e.g. {unmatched[:3]})"
            )
        self.images = images
        self.labels = [labels_dir / f"{p.stem}.png" for p in images]
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """New augmentations each epoch (reaches DataLoader workers unless they are persistent)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image, label = read_image(self.images[index]), read_label(self.labels[index])
        if image.shape[1:] != label.shape:
            raise ValueError(
                f"{self.images[index]} is {tuple(image.shape[1:])} but its annotation is {tuple(label.shape)}"
            )
        if self.transform is not None:
            seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
            image, label = self.transform(image, label, torch.Generator().manual_seed(int(seed)))
        return dict(image=image, label=label, path=str(self.images[index]))


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
