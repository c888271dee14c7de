"""Driving scenes for domain-generalised segmentation (train GTA5 -> test Cityscapes, BDD100K,
Mapillary; train Cityscapes -> test ACDC, Dark Zurich), all labelled with the 19 Cityscapes train ids (255 = ignore).

    ds = DrivingScenes("gta5", root, "train", transform=RandomResizeCropFlip((512, 512), LAYOUTS["gta5"].scale, (1, 1)))
    ds.set_epoch(epoch)                        # beside loader.sampler.set_epoch(epoch)
    val = DrivingScenes("cityscapes", root, "val", transform=ResizeImage(LAYOUTS["cityscapes"].scale))
    item = ds[i]   # image [3, H, W] float32 in [-1, 1], label [H, W] int64 in {0..18, 255}, path str

The transforms are those of `ade20k.py` (a call `transform(image, label, generator)`); items draw
from a generator seeded by (seed, epoch, index), the same in any worker and after a resume.

Layouts (`root` is the dataset folder; as in the dataset configs and README of w1oves/Rein, which
follow mmsegmentation/DAFormer; BDD100K also as mmsegmentation's projects/bdd100k_dataset docs):

    gta5        root/images/00001.png ... 24966.png
                root/labels/00001.png                      Cityscapes label ids (palette PNG)
    cityscapes  root/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
                root/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    bdd100k     root/images/10k/{train,val}/<name>.jpg
                root/labels/sem_seg/masks/{train,val}/<name>.png           already train ids
    mapillary   root/{training,validation}/images/<key>.jpg                 (split "train", "val")
                root/{training,validation}/v1.2/labels/<key>.png            v1.2 ids 0..65 (palette PNG)
    acdc        root/rgb_anon/<condition>/{train,val}/<seq>/<name>_rgb_anon.png     all four conditions
                root/gt/<condition>/{train,val}/<seq>/<name>_gt_labelIds.png        Cityscapes label ids
    darkzurich  root/rgb_anon/val/night/<seq>/<name>_rgb_anon.png                   (the 50 labelled frames)
                root/gt/val/night/<seq>/<name>_gt_labelIds.png                      Cityscapes label ids

An image pairs with the label at the same relative path with its suffix swapped; every image must
have its label. Other files beside the labels (mmseg's converted `*_labelTrainIds.png`,
Cityscapes' `*_color.png`, ...) are ignored. Labels are read raw and mapped here, so no
conversion step is needed: the converted files that the DG repos read (`*_labelTrainIds.png`
from mmseg's/DAFormer's scripts for Cityscapes and GTA5, Rein's `cityscapes_trainIdLabel` for
Mapillary) hold the same tables' output. GTA5 has no validation split in DG work: "train" is all
24,966 images (the official split.mat is not used). Mapillary validation is read at full
resolution; Rein evaluates on copies halved beforehand (tools/convert_datasets/mapillary_resize.py).

GTA5 quirk: most frames are 1914x1052, but some images and their labels differ in size by a few
pixels (noted by a public GTA5 clean-up script; the search tool did not name its repository);
such a label is resized to its image with nearest neighbour. A size mismatch in any other dataset
is an error. (Some copies of GTA5 lack 25 frames, bupt-ai-cz/IAST-ECCV2020#2; early BDD100K image
zips lacked 6 labelled frames, bdd100k/bdd100k#103: both surface as pairing errors or counts.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from unet_seg.data.transforms import (
    IGNORE_INDEX, LabelledImages, Transform, cached_class_counts, class_pixel_counts, read_label_png,
)  # fmt: skip
from unet_seg.errors import DataLayoutError

# The 19 classes in train-id order (cityscapesScripts helpers/labels.py; mmseg CityscapesDataset).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# RGB per train id, the Cityscapes colours (cityscapesScripts labels.py; mmseg's palette).
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

# Cityscapes label id (row index) -> (name, train class or None = 255), cityscapesScripts
# helpers/labels.py; GTA5 labels use the same ids (DAFormer/Rein tools/convert_datasets/gta.py
# maps 7, 8, 11, 12, 13, 17, 19..28, 31, 32, 33 -> 0..18). Ids absent here (34+) -> 255.
CITYSCAPES_LABEL_IDS = (
    ("unlabeled", None), ("ego vehicle", None), ("rectification border", None), ("out of roi", None),
    ("static", None), ("dynamic", None), ("ground", None), ("road", "road"), ("sidewalk", "sidewalk"),
    ("parking", None), ("rail track", None), ("building", "building"), ("wall", "wall"), ("fence", "fence"),
    ("guard rail", None), ("bridge", None), ("tunnel", None), ("pole", "pole"), ("polegroup", None),
    ("traffic light", "traffic light"), ("traffic sign", "traffic sign"), ("vegetation", "vegetation"),
    ("terrain", "terrain"), ("sky", "sky"), ("person", "person"), ("rider", "rider"), ("car", "car"),
    ("truck", "truck"), ("bus", "bus"), ("caravan", None), ("trailer", None), ("train", "train"),
    ("motorcycle", "motorcycle"), ("bicycle", "bicycle"),
)  # fmt: skip

# Mapillary Vistas v1.2 id (row index; names as "readable" in config_v1.2.json, listed in
# facebookresearch/Mask2Former register_mapillary_vistas.py) -> Cityscapes class or None (255).
# The rules are those of w1oves/Rein tools/convert_datasets/mapillary2cityscape.py (from
# openseg-group/openseg.pytorch), applied by hand to the names: a name equal to a Cityscapes class
# maps to it; else names with "trafficsign", "front" or "back" -> traffic sign (so the sign
# *frame* too); "onrail" -> train; "cyclist"/"rider" -> rider; "pole"/"streetlight" -> pole;
# "curb"/"pedestrianarea" -> sidewalk; crosswalk-plain, parking, bike/service lane, lane markings
# -> road; everything else -> ignore. Cross-checked by evaluating those rules on these names.
MAPILLARY_V12_IDS = (
    ("Bird", None), ("Ground Animal", None), ("Curb", "sidewalk"), ("Fence", "fence"), ("Guard Rail", None),
    ("Barrier", None), ("Wall", "wall"), ("Bike Lane", "road"), ("Crosswalk - Plain", "road"),
    ("Curb Cut", "sidewalk"), ("Parking", "road"), ("Pedestrian Area", "sidewalk"), ("Rail Track", None),
    ("Road", "road"), ("Service Lane", "road"), ("Sidewalk", "sidewalk"), ("Bridge", None),
    ("Building", "building"), ("Tunnel", None), ("Person", "person"), ("Bicyclist", "rider"),
    ("Motorcyclist", "rider"), ("Other Rider", "rider"), ("Lane Marking - Crosswalk", "road"),
    ("Lane Marking - General", "road"), ("Mountain", None), ("Sand", None), ("Sky", "sky"), ("Snow", None),
    ("Terrain", "terrain"), ("Vegetation", "vegetation"), ("Water", None), ("Banner", None), ("Bench", None),
    ("Bike Rack", None), ("Billboard", None), ("Catch Basin", None), ("CCTV Camera", None),
    ("Fire Hydrant", None), ("Junction Box", None), ("Mailbox", None), ("Manhole", None), ("Phone Booth", None),
    ("Pothole", None), ("Street Light", "pole"), ("Pole", "pole"), ("Traffic Sign Frame", "traffic sign"),
    ("Utility Pole", "pole"), ("Traffic Light", "traffic light"), ("Traffic Sign (Back)", "traffic sign"),
    ("Traffic Sign (Front)", "traffic sign"), ("Trash Can", None), ("Bicycle", "bicycle"), ("Boat", None),
    ("Bus", "bus"), ("Car", "car"), ("Caravan", None), ("Motorcycle", "motorcycle"), ("On Rails", "train"),
    ("Other Vehicle", None), ("Trailer", None), ("Truck", "truck"), ("Wheeled Slow", None),
    ("Car Mount", None), ("Ego Vehicle", None), ("Unlabeled", None),
)  # fmt: skip

# BDD100K sem_seg masks are already train ids (0..18, 255).
TRAIN_IDS = tuple((name, name) for name in CITYSCAPES_CLASSES)


def label_lookup(rows: tuple[tuple[str, Optional[str]], ...]) -> np.ndarray:
    """Rows (raw name, Cityscapes class or None), indexed by raw id -> uint8 [256]: raw id -> train
    id, 255 for None and for every id past the rows."""
    lookup = np.full(256, IGNORE_INDEX, np.uint8)
    for raw_id, (_, cls) in enumerate(rows):
        if cls is not None:
            lookup[raw_id] = CITYSCAPES_CLASSES.index(cls)
    return lookup


@dataclass(frozen=True)
class Layout:
    """Where one dataset keeps a split (relative to its root) and how its labels read. `scale`
    (long, short side) is the size DG work resizes it to (Rein's configs: mmseg Resize, keeping
    the aspect for evaluation) — for `RandomResizeCropFlip`/`ResizeImage` of ade20k.py."""

    images: dict[str, str]
    labels: dict[str, str]
    image_suffix: str
    label_suffix: str
    ids: tuple[tuple[str, Optional[str]], ...]
    scale: tuple[int, int]
    resize_label_to_image: bool = False
    within: Optional[dict[str, str]] = None  # split -> glob prefix under `images`, when splits share folders


LAYOUTS = {
    "gta5": Layout(
        {"train": "images"}, {"train": "labels"}, ".png", ".png", CITYSCAPES_LABEL_IDS, (1280, 720), True
    ),
    "cityscapes": Layout(
        {s: f"leftImg8bit/{s}" for s in ("train", "val")},
        {s: f"gtFine/{s}" for s in ("train", "val")},
        "_leftImg8bit.png",
        "_gtFine_labelIds.png",
        CITYSCAPES_LABEL_IDS,
        (1024, 512),
    ),
    "bdd100k": Layout(
        {s: f"images/10k/{s}" for s in ("train", "val")},
        {s: f"labels/sem_seg/masks/{s}" for s in ("train", "val")},
        ".jpg",
        ".png",
        TRAIN_IDS,
        (1280, 720),
    ),
    "mapillary": Layout(
        {"train": "training/images", "val": "validation/images"},
        {"train": "training/v1.2/labels", "val": "validation/v1.2/labels"},
        ".jpg",
        ".png",
        MAPILLARY_V12_IDS,
        (1024, 512),
    ),
    "acdc": Layout(
        {s: "rgb_anon" for s in ("train", "val")},
        {s: "gt" for s in ("train", "val")},
        "_rgb_anon.png",
        "_gt_labelIds.png",
        CITYSCAPES_LABEL_IDS,
        (960, 544),  # DAFormer's ACDC / Dark Zurich 960x540, whose short side rounds to 544 anyway
        within={s: f"*/{s}/" for s in ("train", "val")},
    ),
    "darkzurich": Layout(
        {"val": "rgb_anon/val"}, {"val": "gt/val"}, "_rgb_anon.png", "_gt_labelIds.png", CITYSCAPES_LABEL_IDS, (960, 544)
    ),
}


def find_pairs(name: str, root: Union[str, Path], split: str) -> list[tuple[Path, Path]]:
    """(image, label) paths of one split, sorted by image path; errors name the expected layout."""
    if name not in LAYOUTS:
        raise ValueError(f"dataset must be one of {tuple(LAYOUTS)}, got {name!r}")
    layout, root = LAYOUTS[name], Path(root)
    if split not in layout.images:
        raise ValueError(f"{name} has splits {tuple(layout.images)}, got {split!r}")
    images_dir, labels_dir = root / layout.images[split], root / layout.labels[split]
    expected = (
        f"{images_dir}/**/*{layout.image_suffix} with {labels_dir}/**/*{layout.label_suffix} "
        f"at the same relative paths"
    )
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise DataLayoutError(f"{d} is not a directory; expected the {name} layout: {expected}")
    within = (layout.within or {}).get(split, "")
    images = sorted(images_dir.glob(f"{within}**/*{layout.image_suffix}"))
    if not images:
        raise DataLayoutError(f"no *{layout.image_suffix} images under {images_dir}; expected {expected}")
    pairs = []
    for image in images:
        stem = image.relative_to(images_dir).as_posix()[: -len(layout.image_suffix)]
        pairs.append((image, labels_dir / f"{stem}{layout.label_suffix}"))
    unlabelled = [str(label) for _, label in pairs if not label.is_file()]
    if unlabelled:
        raise DataLayoutError(
            f"{len(unlabelled)} of {len(pairs)} {name} {split} images lack a label (first: {unlabelled[:3]}); "
            f"expected {expected}"
        )
    return pairs


def read_label(path: Path, lookup: np.ndarray) -> Tensor:
    """A single-channel (grey or palette) label PNG of raw ids -> train ids [H, W] int64 in
    {0..18, 255}, through `lookup` (uint8 [256])."""
    return torch.from_numpy(lookup[read_label_png(path)].astype(np.int64))


class DrivingScenes(LabelledImages):
    """Items: dict(image [3, H, W] float32 in [-1, 1], label [H, W] int64 (Cityscapes train ids,
    255 = ignore), path str of the image). Without a transform, sizes are the files' own."""

    def __init__(
        self,
        name: str,
        root: Union[str, Path],
        split: str,
        transform: Optional[Transform] = None,
        seed: int = 0,
    ):
        pairs = find_pairs(name, root, split)
        self.root, self.split, self.layout = Path(root), split, LAYOUTS[name]
        self.lookup = label_lookup(self.layout.ids)
        read = functools.partial(read_label, lookup=self.lookup)
        super().__init__(pairs, read, transform, seed, resize_label_to_image=self.layout.resize_label_to_image)

    def class_counts(self, cache: Union[str, Path, None] = None) -> np.ndarray:
        """int64 [N, 19]: pixels of each train id in each label file (its own resolution), for
        `RareClassSampling`; computed once (reads every label) and cached at `cache`, by default
        `<root>/class_counts_<split>.json` next to the data."""
        cache = Path(cache) if cache is not None else self.root / f"class_counts_{self.split}.json"
        keys = [label.relative_to(self.root).as_posix() for _, label in self.pairs]
        labels = (read_label(label, self.lookup) for _, label in self.pairs)
        compute = lambda: class_pixel_counts(tqdm(labels, total=len(keys), desc="class statistics"), len(CITYSCAPES_CLASSES))  # noqa: E731
        return cached_class_counts(cache, keys, compute)
