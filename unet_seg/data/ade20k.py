"""ADE20K-150 (the SceneParsing benchmark, ADEChallengeData2016) for semantic segmentation.

    ds = ADE20K(root, "training", transform=RandomResizeCropFlip(crop=(512, 512)))   # from .transforms
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

from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from ..errors import DataLayoutError, InputError
from .transforms import IGNORE_INDEX, LabelledImages, Transform, read_label_png

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

def reduce_zero_label(label: Tensor) -> Tensor:
    """Raw ADE20K label [H, W] (uint8, 0 = other, 1..150) -> int64 [H, W]: 0 -> 255, k -> k - 1."""
    label = label.long()
    if label.numel():
        lo, hi = (int(v) for v in label.aminmax())
        if lo < 0 or hi > len(ADE20K_CLASSES):
            raise ValueError(f"raw ADE20K labels must lie in 0..{len(ADE20K_CLASSES)}, got values in {lo}..{hi}")
    return torch.where(label == 0, IGNORE_INDEX, label - 1)


def read_label(path: Path) -> Tensor:
    """An ADE20K annotation PNG -> reduced label [H, W] int64 in {0..149, 255}."""
    raw = read_label_png(path, "annotations")
    try:
        return reduce_zero_label(torch.tensor(raw, dtype=torch.long))  # a copy: the PNG's array is read-only (from_numpy warned)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from e


class ADE20K(LabelledImages):
    """Items: dict(image [3, H, W] float32 in [-1, 1], label [H, W] int64 (0..149, 255 = ignore),
    path str of the image). Without a transform, sizes are the files' own (they vary)."""

    label_name = "annotation"

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
                raise DataLayoutError(f"{d} is not a directory; expected the ADEChallengeData2016 layout: {layout}")
        images = sorted(images_dir.glob("*.jpg"))
        labels = sorted(labels_dir.glob("*.png"))
        if not images:
            raise DataLayoutError(f"no .jpg images in {images_dir}; expected {layout}")
        unlabelled = sorted({p.stem for p in images} - {p.stem for p in labels})
        unmatched = sorted({p.stem for p in labels} - {p.stem for p in images})
        if unlabelled or unmatched:
            raise DataLayoutError(
                f"images and annotations of {split} do not pair up ({layout}): {len(unlabelled)} images lack an "
                f"annotation (e.g. {unlabelled[:3]}), {len(unmatched)} annotations lack an image (e.g. {unmatched[:3]})"
            )
        super().__init__([(p, labels_dir / f"{p.stem}.png") for p in images], read_label, transform, seed)
