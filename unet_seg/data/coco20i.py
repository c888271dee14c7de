"""COCO-20i few-shot segmentation episodes, read from the layout that HSNet-style code uses.

    ds = COCO20i("/data/COCO2014", fold=0, split="val", shots=1, size=512)   # 1000 episodes, seed 0
    ep = ds[i]
    # ep["query"] [3, S, S] float32 in [-1, 1]        ep["query_mask"] [S, S] int64 in {0, 1, 255}
    # ep["supports"] [K, 3, S, S]                      ep["support_masks"] [K, S, S]
    # ep["class_id"] [] int64 in 1..80 (its label)     ep["query_id"] str, ep["support_ids"] list[str]

The keys are those of `unet_seg.data.synthetic.FewShotEpisodes`' episodes, plus the image ids, and
so is the class convention: an episode's "class_id" is its class's label, 1..80, the value of its
pixels in the class maps, 0 being background (`COCO20I_LABELS[label]` names it); class c of
`fold_classes` and `COCO20I_CLASSES` (0..79, HSNet's numbering) has label c + 1.

Layout (HSNet README, "Preparing Few-Shot Segmentation Datasets"; Matcher, whose loader DiffewS
imports, uses the same one):

    root/                                 HSNet's Datasets_HSN/COCO2014
      train2014/<stem>.jpg                COCO 2014 images, stem = COCO_train2014_<12 digits>
      val2014/<stem>.jpg                  (images.cocodataset.org/zips/{train,val}2014.zip)
      annotations/train2014/<stem>.png    per-image class maps: HSNet's train2014.zip and
      annotations/val2014/<stem>.png      val2014.zip (Google Drive links in its README)

A class map is a single-channel 8-bit PNG the size of its image: 0 background, c + 1 for class c
in 0..79, and 255 ignore where a map has it. Class c is COCO's c-th category in category-id
order (`COCO20I_CLASSES`): HSNet's data/coco.py keeps the pixels equal to `class_id + 1` with
class ids 0..79, and mask conversions beside it (e.g. a `coco_cat2trainid` table: bicycle 2,
stop sign 12, toilet 62, teddy bear 78) number the 80 categories 1..80 in that order.

Protocol, with the source of each point:

  * episodes of `split="train"` come from train2014, of `split="val"` from val2014 (HSNet's
    'trn' / 'val' split lists; the names it joins to COCO2014/ carry that folder).
  * fold rule "interleaved": fold f tests classes {f + 4k : k = 0..19} (0-indexed). HSNet
    `build_class_ids`: `fold + nfolds * v`; PFENet util/dataset.py with `use_split_coco=True`
    (1-indexed `range(f + 1, 81, 4)`), the setting of PFENet's released COCO configs.
    Fold rule "consecutive": fold f tests {20f, ..., 20f + 19}, PFENet's `use_split_coco=False`
    branch (1-indexed 20f + 1..20f + 20), also used by other FSS code bases (e.g. DRNet).
    Both rules: 4 disjoint folds of 20 covering the 80; training uses the other 60.
  * episode masks: pixels of the episode's class -> 1, every other class -> 0, test-fold
    classes included (HSNet: `mask[mask != class + 1] = 0`; PFENet the same). 255 stays 255
    (PFENet); HSNet would turn it into 0 as well. Training images that also show a test-fold
    class are kept, its pixels being background (PFENet's `make_dataset` lists an image under
    every training class it shows; how HSNet built its lists is unpublished, hsnet issue #35).
  * an episode: a class uniform over the split's classes, a query uniform over that class's
    images, K distinct supports uniform over its other images (HSNet `load_frame` samples the
    supports with replacement, only != query; PFENet draws them distinct).
  * length: 1000 episodes for val (HSNet `__len__`; its test.py fixes the seed to 0), for train
    the number of images listed under some training class (HSNet `__len__` for 'trn'). Same
    protocol as HSNet, not the same draws (HSNet draws from numpy's global generator).
  * resize to a square: HSNet resizes images to (img_size, img_size) (torchvision Resize,
    bilinear; 400 in its test.py) and masks with F.interpolate "nearest". Here images bilinear
    with antialiasing, masks "nearest", to `size`, a multiple of 8 for SD's VAE.

Split lists without pickles. HSNet lists the images of each class in data/splits/coco/
{trn,val}/fold{0..3}.pkl; those files are never unpickled here. Instead the class maps are
scanned once per COCO split into a JSON index, stem -> {class: pixel count}, kept at
`root/annotations/<train2014|val2014>_class_pixels.json` (written on first use, reused after,
rebuilt when the set of PNGs changes; a few minutes for the 123k maps of COCO 2014). The index
serves every fold and both rules: class c's images are those with at least `min_pixels` pixels
of c. `min_pixels=1` (any pixel) is the default; PFENet keeps a class in an image only from
2·32·32 = 2048 pixels on. Build the index once before a multi-process run, so that the ranks
do not all scan: `for s in ("train2014", "val2014"): class_pixel_index(root, s)`.

Every episode is a pure function of (seed, epoch, index), so episodes are the same in any
DataLoader worker, on any rank and after a resume; `set_epoch` gives training new episodes each
epoch and evaluation leaves the epoch at 0.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from unet_seg.data.transforms import IGNORE_INDEX, read_image, read_label_png
from unet_seg.errors import DataLayoutError, InputError
from unet_seg.files import atomic_path

NUM_FOLDS = 4
FOLD_RULES = ("interleaved", "consecutive")
SPLITS = {"train": "train2014", "val": "val2014"}
VAL_EPISODES = 1000

# COCO's 80 object categories in category-id order: class c has value c + 1 in the class maps.
# Ten to a row: row r holds classes 10·r .. 10·r + 9.
# fmt: off
COCO20I_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# fmt: on
NUM_CLASSES = len(COCO20I_CLASSES)
COCO20I_LABELS = ("background", *COCO20I_CLASSES)  # an episode's class_id -> name

LAYOUT = (
    "root/{train2014,val2014}/<stem>.jpg (COCO 2014 images) with root/annotations/{train2014,val2014}/<stem>.png "
    "(HSNet's per-image class maps: 0 background, 1..80 classes, 255 ignore)"
)


def fold_classes(fold: int, rule: str = "interleaved") -> tuple[int, ...]:
    """The 20 test classes (0-indexed) of `fold` in 0..3: interleaved {fold + 4k}, consecutive {20·fold + k}."""
    if not isinstance(fold, int) or not 0 <= fold < NUM_FOLDS:
        raise ValueError(f"fold must be an int in [0, {NUM_FOLDS}), got {fold!r}")
    if rule not in FOLD_RULES:
        raise ValueError(f"rule must be one of {FOLD_RULES}, got {rule!r}")
    per_fold = NUM_CLASSES // NUM_FOLDS
    if rule == "interleaved":
        return tuple(fold + NUM_FOLDS * k for k in range(per_fold))
    return tuple(per_fold * fold + k for k in range(per_fold))


def train_classes(fold: int, rule: str = "interleaved") -> tuple[int, ...]:
    """The 60 classes that `fold` trains on: all but `fold_classes(fold, rule)`, ascending."""
    test = set(fold_classes(fold, rule))
    return tuple(c for c in range(NUM_CLASSES) if c not in test)


def read_class_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A class-map PNG -> (uint8 [H, W] with values in {0..80, 255}, pixel count of each value [256])."""
    raw = read_label_png(path, "class maps")
    counts = np.bincount(raw.ravel(), minlength=256)
    bad = np.flatnonzero(counts[NUM_CLASSES + 1 : IGNORE_INDEX]) + NUM_CLASSES + 1
    if bad.size:
        raise InputError(f"{path}: values must be 0 (background), 1..{NUM_CLASSES} or 255, found {bad[:5].tolist()}")
    return raw, counts


def class_pixels(path: Path) -> dict[int, int]:
    """Pixel count of each class (0-indexed) present in the class map at `path`."""
    counts = read_class_map(path)[1][1 : NUM_CLASSES + 1]
    return {int(c): int(n) for c, n in enumerate(counts) if n}


def class_pixel_index(root: Union[str, Path], coco_split: str) -> dict[str, dict[int, int]]:
    """stem -> {class: pixel count} for every class map of `coco_split` ("train2014"/"val2014"),
    from the JSON at `root/annotations/<coco_split>_class_pixels.json` when it lists exactly the
    PNGs there, else by scanning them and writing that JSON (a warning if it cannot be written)."""
    masks_dir = Path(root) / "annotations" / coco_split
    if not masks_dir.is_dir():
        raise DataLayoutError(f"{masks_dir} is not a directory; expected the COCO-20i layout {LAYOUT}")
    stems = sorted(p.stem for p in masks_dir.glob("*.png"))
    if not stems:
        raise DataLayoutError(f"no .png class maps in {masks_dir}; expected the COCO-20i layout {LAYOUT}")
    cache = masks_dir.parent / f"{coco_split}_class_pixels.json"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if sorted(stored) == stems:
            return {stem: {int(c): n for c, n in stored[stem].items()} for stem in stems}
    with tqdm(stems, desc=f"indexing {masks_dir}") as bar:  # closed before an error is reported, not after
        index = {stem: class_pixels(masks_dir / f"{stem}.png") for stem in bar}
    try:
        with atomic_path(cache) as tmp:
            tmp.write_text(json.dumps(index, separators=(",", ":")))
    except OSError as e:
        warnings.warn(f"could not write the class index {cache} ({e}); it will be rebuilt on every start")
    return index


def _resize(image: Tensor, mask: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """image [3, H, W] bilinear (antialiased), mask [H, W] nearest -> [3, size, size], [size, size]."""
    return _resize_image(image, size), _resize_mask(mask, size)


def _resize_image(image: Tensor, size: int) -> Tensor:
    image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return image.clamp(-1, 1)


def _resize_mask(mask: Tensor, size: int) -> Tensor:
    return F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()


class COCO20i(Dataset):
    """Item i -> K-shot episode dict (module docstring); a pure function of (seed, epoch, i).

    fold 0..3; split "train" (the fold's 60 training classes, train2014) or "val" (its 20 test
    classes, val2014); shots K >= 1; size: square side, a multiple of 8; episodes: the length
    (default 1000 for val, the number of listed images for train); fold_rule "interleaved"
    (HSNet, the standard) or "consecutive"; min_pixels: least pixels of a class for an image to
    be listed under it.
    """

    def __init__(
        self,
        root: Union[str, Path],
        fold: int,
        split: str = "train",
        shots: int = 1,
        size: int = 512,
        episodes: Optional[int] = None,
        seed: int = 0,
        fold_rule: str = "interleaved",
        min_pixels: int = 1,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if not isinstance(shots, int) or shots < 1:
            raise ValueError(f"shots must be an int >= 1, got {shots!r}")
        if not isinstance(size, int) or size < 8 or size % 8:
            raise ValueError(f"size must be a positive multiple of 8 (the VAE factor), got {size!r}")
        if episodes is not None and (not isinstance(episodes, int) or episodes < 1):
            raise ValueError(f"episodes must be None or an int >= 1, got {episodes!r}")
        if not isinstance(min_pixels, int) or min_pixels < 1:
            raise ValueError(f"min_pixels must be an int >= 1, got {min_pixels!r}")
        root = Path(root)
        if not root.is_dir():
            raise DataLayoutError(f"{root} is not a directory; expected the COCO-20i layout {LAYOUT}")
        coco_split = SPLITS[split]
        self.classes = fold_classes(fold, fold_rule) if split == "val" else train_classes(fold, fold_rule)
        index = class_pixel_index(root, coco_split)
        self.images_dir, self.masks_dir = root / coco_split, root / "annotations" / coco_split
        without_image = sorted(set(index) - {p.stem for p in self.images_dir.glob("*.jpg")})
        if without_image:
            raise DataLayoutError(
                f"{len(without_image)} class maps in {self.masks_dir} have no image {self.images_dir}/<stem>.jpg "
                f"(e.g. {without_image[:3]}); expected the COCO-20i layout {LAYOUT}"
            )
        self.class_images: dict[int, list[str]] = {c: [] for c in self.classes}
        for stem, counts in index.items():  # sorted stems, so each list is sorted
            for c, n in counts.items():
                if c in self.class_images and n >= min_pixels:
                    self.class_images[c].append(stem)
        scarce = {COCO20I_CLASSES[c]: len(v) for c, v in self.class_images.items() if len(v) < shots + 1}
        if scarce:
            raise InputError(
                f"{shots}-shot episodes need at least {shots + 1} images per class with >= {min_pixels} pixels of "
                f"it; in {self.masks_dir} these classes of fold {fold} ({split}) have fewer: {scarce}"
            )
        listed = len(set().union(*self.class_images.values()))
        self.length = episodes if episodes is not None else (VAL_EPISODES if split == "val" else listed)
        self.shots, self.size, self.seed, self.epoch = shots, size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """New episodes each epoch (reaches DataLoader workers unless they are persistent)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _load(self, stem: str, class_id: int) -> tuple[Tensor, Tensor]:
        """Image [3, S, S] in [-1, 1] and binary mask [S, S] in {0, 1, 255} of class `class_id`."""
        image = read_image(self.images_dir / f"{stem}.jpg")
        raw = torch.from_numpy(read_class_map(self.masks_dir / f"{stem}.png")[0].astype(np.int64))
        if image.shape[1:] != raw.shape:
            raise InputError(f"{stem}: the image is {tuple(image.shape[1:])} but its class map is {tuple(raw.shape)}")
        return _resize(image, _class_mask(raw, class_id), self.size)

    def image(self, stem: str) -> Tensor:
        """The image `stem` as episodes show it: [3, S, S] in [-1, 1]."""
        return _resize_image(read_image(self.images_dir / f"{stem}.jpg"), self.size)

    def mask(self, stem: str, class_id: int) -> Tensor:
        """The mask of class `class_id` (0..79) in image `stem` as episodes show it: [S, S] in {0, 1, 255}."""
        raw = torch.from_numpy(read_class_map(self.masks_dir / f"{stem}.png")[0].astype(np.int64))
        return _resize_mask(_class_mask(raw, class_id), self.size)

    def episode_ids(self, index: int) -> tuple[int, str, list[str]]:
        """Episode `index`'s draws without reading a file: (class 0..79, query stem, support stems)."""
        if not 0 <= index < self.length:
            raise IndexError(f"episode index {index} out of range for {self.length} episodes")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        class_id = self.classes[rng.integers(len(self.classes))]
        stems = self.class_images[class_id]
        q = int(rng.integers(len(stems)))
        others = rng.choice(len(stems) - 1, size=self.shots, replace=False)
        return class_id, stems[q], [stems[j + (j >= q)] for j in others.tolist()]  # skip the query's position

    def __getitem__(self, index: int) -> dict:
        class_id, query_id, support_ids = self.episode_ids(index)
        query, query_mask = self._load(query_id, class_id)
        supports, support_masks = zip(*(self._load(stem, class_id) for stem in support_ids))
        return dict(
            query=query,
            query_mask=query_mask,
            supports=torch.stack(supports),
            support_masks=torch.stack(support_masks),
            class_id=torch.tensor(class_id + 1),  # the label: 0 is background
            query_id=query_id,
            support_ids=support_ids,
        )


def _class_mask(raw: Tensor, class_id: int) -> Tensor:
    """A class map [H, W] -> the mask of class `class_id` (0..79): 1 on it, 255 where ignored, else 0."""
    return torch.where(raw == IGNORE_INDEX, IGNORE_INDEX, (raw == class_id + 1).long())
