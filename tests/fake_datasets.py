"""Fake datasets in the exact on-disk layouts of the real ones, at their native image sizes, for
rehearsals of the recipes' real path (`--model` and data roots, not `--demo`).

    from tests.fake_datasets import write_driving, write_ade20k, write_coco20i
    write_driving(tmp_path / "data")            # gta5/ cityscapes/ bdd100k/ mapillary/ acdc/ darkzurich/
    write_ade20k(tmp_path / "ADEChallengeData2016")
    write_coco20i(tmp_path / "COCO2014")

Each writer lays out folders and file names as the dataset ships them (see the readers:
`unet_seg.data.driving`, `.ade20k`, `.coco20i`), with one or two images per split at the sizes
the real files have (GTA5 1914×1052, Cityscapes 2048×1024, BDD100K 1280×720, Mapillary mixed
phone and camera sizes, ACDC / Dark Zurich 1920×1080, ADE20K and COCO's varied sizes, odd sides
and portrait ones among them). Labels are single-channel 8-bit PNGs of the raw ids each dataset
uses (palette PNGs where the real files are: GTA5, Mapillary), painted as a grid of cells that
holds every evaluated class (ADE20K: a draw of them per image), so crops, rare-class sampling,
class prompts and few-shot episodes all find what they look for. Images are smooth random colour fields (they compress like photos,
so native sizes stay cheap to write and read). Every writer is a pure function of its `seed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# (width, height) of the real files. Mapillary Vistas: phone and camera frames of many sizes,
# landscape and portrait; ADE20K and COCO: web photos, odd sides and portrait ones included.
SIZES = {
    "gta5": [(1914, 1052), (1914, 1052)],
    "cityscapes": [(2048, 1024)],
    "bdd100k": [(1280, 720)],
    "mapillary": [(4032, 3024), (1920, 1080)],
    "acdc": [(1920, 1080), (1920, 1080)],  # one frame of each of two conditions
    "darkzurich": [(1920, 1080)],
    "ade20k": [(683, 512), (512, 683), (640, 480), (1024, 768)],  # 4: a batch of 2 on each of 2 ranks
    "ade20k_val": [(500, 375), (256, 341)],
    "coco_train": [(640, 427), (427, 640)],
    "coco_val": [(640, 480), (500, 375), (480, 640), (640, 427), (612, 612), (375, 500)],
}

# Raw label ids painted into the driving labels: every Cityscapes train class (by label id) plus
# ids that map to ignore (0 unlabeled, 4 static, 9 parking, 29 caravan).
CITYSCAPES_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33, 0, 4, 9, 29)
BDD100K_IDS = tuple(range(19)) + (255,)  # already train ids
MAPILLARY_IDS = (13, 2, 17, 6, 3, 45, 48, 50, 30, 29, 27, 19, 20, 55, 61, 54, 58, 57, 52, 0, 65, 25)  # v1.2


def smooth_image(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A random RGB colour field [height, width]: a coarse random grid, bilinearly enlarged."""
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


def grid_ids(width: int, height: int, ids: Sequence[int], rng: np.random.Generator, cols: int = 6) -> np.ndarray:
    """uint8 [height, width]: a grid of `cols` columns and as many rows as `ids` need, each cell one
    id (every id present), in a random order per image."""
    ids = rng.permutation(np.asarray(ids, np.uint8))
    rows = -(-len(ids) // cols)
    cells = np.resize(ids, rows * cols).reshape(rows, cols)
    ys = np.minimum(np.arange(height) * rows // height, rows - 1)
    xs = np.minimum(np.arange(width) * cols // width, cols - 1)
    return cells[ys[:, None], xs[None, :]]


def write_pair(image: Path, label: Path, size: tuple[int, int], ids: Sequence[int], rng, palette: bool = False) -> None:
    """An image (format from its suffix) and its label PNG of raw `ids`; `palette`: a "P"-mode
    PNG with a colour table, as GTA5 and Mapillary ship theirs (the ids are the pixel values)."""
    for p in (image, label):
        p.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    smooth_image(width, height, rng).save(image)  # JPEG or PNG by the suffix, as the dataset ships it
    ids = grid_ids(width, height, ids, rng)
    if palette:
        png = Image.fromarray(ids, mode="P")
        png.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
    else:
        png = Image.fromarray(ids, mode="L")
    png.save(label)


def write_gta5(root: Path, seed: int = 0) -> Path:
    """root/images/00001.png, root/labels/00001.png (palette PNGs of Cityscapes label ids)."""
    rng = np.random.default_rng([seed, 1])
    for i, size in enumerate(SIZES["gta5"], 1):
        write_pair(root / "images" / f"{i:05d}.png", root / "labels" / f"{i:05d}.png", size, CITYSCAPES_IDS, rng, palette=True)
    return root


def write_cityscapes(root: Path, splits: Sequence[str] = ("train", "val"), seed: int = 0) -> Path:
    """root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png and gtFine/..._gtFine_labelIds.png."""
    rng = np.random.default_rng([seed, 2])
    cities = {"train": "aachen", "val": "frankfurt"}
    for split in splits:
        for i, size in enumerate(SIZES["cityscapes"]):
            stem = f"{cities[split]}/{cities[split]}_{i:06d}_000019"
            write_pair(root / "leftImg8bit" / split / f"{stem}_leftImg8bit.png",
                       root / "gtFine" / split / f"{stem}_gtFine_labelIds.png", size, CITYSCAPES_IDS, rng)  # fmt: skip
    return root


def write_bdd100k(root: Path, seed: int = 0) -> Path:
    """root/images/10k/val/<name>.jpg, root/labels/sem_seg/masks/val/<name>.png (train ids)."""
    rng = np.random.default_rng([seed, 3])
    for i, size in enumerate(SIZES["bdd100k"]):
        name = f"7d2f7975-e0c1c5a{i}"
        write_pair(root / "images" / "10k" / "val" / f"{name}.jpg", root / "labels" / "sem_seg" / "masks" / "val" / f"{name}.png",
                   size, BDD100K_IDS, rng)  # fmt: skip
    return root


def write_mapillary(root: Path, seed: int = 0) -> Path:
    """root/validation/images/<key>.jpg, root/validation/v1.2/labels/<key>.png (palette, v1.2 ids)."""
    rng = np.random.default_rng([seed, 4])
    for i, size in enumerate(SIZES["mapillary"]):
        key = f"_1Gn_xkw7sa_i9GU4mkxx{i}"
        write_pair(root / "validation" / "images" / f"{key}.jpg", root / "validation" / "v1.2" / "labels" / f"{key}.png",
                   size, MAPILLARY_IDS, rng, palette=True)  # fmt: skip
    return root


def write_acdc(root: Path, seed: int = 0) -> Path:
    """root/rgb_anon/<condition>/val/<seq>/<name>_rgb_anon.png, root/gt/<condition>/val/<seq>/<name>_gt_labelIds.png."""
    rng = np.random.default_rng([seed, 5])
    for (condition, seq), size in zip((("fog", "GOPR0475"), ("night", "GOPR0351")), SIZES["acdc"]):
        stem = f"{condition}/val/{seq}/{seq}_frame_000041"
        write_pair(root / "rgb_anon" / f"{stem}_rgb_anon.png", root / "gt" / f"{stem}_gt_labelIds.png", size, CITYSCAPES_IDS, rng)
    return root


def write_darkzurich(root: Path, seed: int = 0) -> Path:
    """root/rgb_anon/val/night/<seq>/<name>_rgb_anon.png, root/gt/val/night/<seq>/<name>_gt_labelIds.png."""
    rng = np.random.default_rng([seed, 6])
    for i, size in enumerate(SIZES["darkzurich"]):
        stem = f"val/night/GOPR0356/GOPR0356_frame_00032{i}"
        write_pair(root / "rgb_anon" / f"{stem}_rgb_anon.png", root / "gt" / f"{stem}_gt_labelIds.png", size, CITYSCAPES_IDS, rng)
    return root


def write_driving(root: Path, seed: int = 0) -> Path:
    """All six driving datasets under root/{gta5, cityscapes, bdd100k, mapillary, acdc, darkzurich}
    (DIFF's and QueryDiff's --data-root) -> root."""
    write_gta5(root / "gta5", seed)
    write_cityscapes(root / "cityscapes", seed=seed)
    write_bdd100k(root / "bdd100k", seed)
    write_mapillary(root / "mapillary", seed)
    write_acdc(root / "acdc", seed)
    write_darkzurich(root / "darkzurich", seed)
    return root


def write_ade20k(root: Path, classes: int = 23, seed: int = 0) -> Path:
    """ADEChallengeData2016: root/images/{training,validation}/ADE_*.jpg, root/annotations/.../ADE_*.png
    (0 other and `classes` of the 150, a different draw per image: real images show about ten)."""
    rng = np.random.default_rng([seed, 7])
    for split, prefix, sizes in (("training", "ADE_train", SIZES["ade20k"]), ("validation", "ADE_val", SIZES["ade20k_val"])):
        for i, size in enumerate(sizes, 1):
            stem = f"{prefix}_{i:08d}"
            ids = [0, *rng.choice(np.arange(1, 151), classes, replace=False)]
            write_pair(root / "images" / split / f"{stem}.jpg", root / "annotations" / split / f"{stem}.png", size, ids, rng)
    return root


def write_coco20i(root: Path, train_images: int = 2, val_images: int = 6, seed: int = 0) -> Path:
    """HSNet's COCO2014: root/{train2014,val2014}/COCO_<split>_<12 digits>.jpg with per-image class
    maps root/annotations/<split>/<stem>.png (0 background, 1..80, 255 ignore), every class in every
    map: `train_images` >= shots + 1 for training episodes, `val_images` >= 6 for 5-shot ones."""
    rng = np.random.default_rng([seed, 8])
    for split, n, sizes in (("train2014", train_images, SIZES["coco_train"]), ("val2014", val_images, SIZES["coco_val"])):
        for i in range(n):
            stem = f"COCO_{split}_{9 + 16 * i:012d}"
            write_pair(root / split / f"{stem}.jpg", root / "annotations" / split / f"{stem}.png", sizes[i % len(sizes)],
                       list(range(81)) + [255], rng)  # fmt: skip
    return root
