"""Reading and transforming (image, label) pairs for the dataset readers (ADE20K, driving scenes,
COCO-20i). Transforms are `transform(image [3, H, W], label [H, W], generator) -> (image, label)`,
drawing all randomness from the generator so an item depends only on its seed.

    RandomResizeCropFlip, ResizeImage           mmseg's ADE20K-style pipeline, evaluation resize
    Compose, Resize, RandomCrop(cat_max_ratio), RandomFlip, PhotoMetricDistortion
                                                DAFormer's GTA5 pipeline (DIFF's official config)
    RandomShortEdgeResize, Rescale              Rein's / QueryDiff's GTA5 resize; Mapillary at half size
    RareClassSampling(dataset, counts)          DAFormer's rare-class sampling over a dataset
    LabelledImages(pairs, read_label)           (image file, label file) pairs as items, for the readers
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..checks import check_multiple_of_8
from ..errors import InputError
from ..files import atomic_path

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


def read_label_png(path: Path, what: str = "labels") -> np.ndarray:
    """A single-channel 8-bit PNG of ids (grey or palette) -> its raw ids, uint8 [H, W]; `what`
    names the files in the error (colour maps and 16-bit PNGs are refused)."""
    with Image.open(path) as img:
        raw = np.asarray(img)
    if raw.ndim != 2 or raw.dtype != np.uint8:
        raise InputError(
            f"{path}: {what} must be single-channel 8-bit PNGs of ids (not colour maps), "
            f"got array shape {raw.shape} of {raw.dtype}"
        )
    return raw


class LabelledImages(torch.utils.data.Dataset):
    """(image file, label file) pairs -> items dict(image [3, H, W] float32 in [-1, 1], label [H, W]
    int64, path str of the image), the transform drawing from `item_generator(seed, epoch, index)`.
    `read_label(path) -> int64 [H, W]`; an image and its label must have one size, unless
    `resize_label_to_image` (the label is resized to the image, nearest)."""

    label_name = "label"  # what errors call a label file

    def __init__(
        self, pairs: list[tuple[Path, Path]], read_label: Callable[[Path], Tensor], transform: Optional[Transform] = None,
        seed: int = 0, resize_label_to_image: bool = False,
    ):  # fmt: skip
        self.pairs, self.read_label, self.resize_label_to_image = pairs, read_label, resize_label_to_image
        self.transform, self.seed, self.epoch = transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """New augmentations each epoch (reaches DataLoader workers unless they are persistent)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        return self.item(index, item_generator(self.seed, self.epoch, index))

    def item(self, index: int, generator: torch.Generator) -> dict:
        """Item `index` transformed with draws from `generator` (`RareClassSampling` re-draws crops)."""
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), self.read_label(label_path)
        if image.shape[1:] != label.shape:
            if not self.resize_label_to_image:
                raise InputError(f"{image_path} is {tuple(image.shape[1:])} but its {self.label_name} is {tuple(label.shape)}")
            label = F.interpolate(label[None, None].float(), size=image.shape[1:], mode="nearest-exact")[0, 0].long()
        if self.transform is not None:
            image, label = self.transform(image, label, generator)
        return dict(image=image, label=label, path=str(image_path))


def _resize(image: Tensor, label: Tensor, size: tuple[int, int], mode: str = "bilinear", antialias: bool = False) -> tuple[Tensor, Tensor]:
    """Image bilinear without antialiasing by default (mmcv's cv2 INTER_LINEAR, which the releases'
    mmseg pipelines use), label nearest at pixel centres (cv2's INTER_NEAREST samples the top-left
    corner instead, up to half a pixel off the image: not copied)."""
    image = F.interpolate(image[None], size=size, mode=mode, antialias=antialias, align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image.clamp(-1, 1), label


@dataclass(frozen=True)
class RandomResizeCropFlip:
    """mmseg's ADE20K training pipeline without photometric distortion and category-ratio retries:
    resize to fit `scale` (long, short side) times a ratio drawn uniformly from `ratio_range`,
    keeping the aspect; crop `crop` (H, W) at a random place, padding with 0 (mid grey) and 255
    (ignore) where the image is smaller; flip left-right with probability 1/2. With `keep_ratio`
    False the image is resized to `scale` read as (H, W) times the ratio, the aspect ignored
    (mmseg `Resize(keep_ratio=False)`; DiGSeg's "resize to 512 × 512, scale jittering")."""

    crop: tuple[int, int] = (512, 512)
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    keep_ratio: bool = True

    def __post_init__(self):
        check_multiple_of_8(self.crop, "crop")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {self.ratio_range}")

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """image [3, H, W], label [H, W] -> image [3, *crop], label [*crop]."""
        lo, hi = self.ratio_range
        ratio = lo + (hi - lo) * torch.rand((), generator=generator).item()
        h, w = image.shape[1:]
        if self.keep_ratio:
            factor = ratio * min(max(self.scale) / max(h, w), min(self.scale) / min(h, w))
            h, w = h * factor, w * factor
        else:
            h, w = self.scale[0] * ratio, self.scale[1] * ratio
        image, label = _resize(image, label, (max(1, round(h)), max(1, round(w))))
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
        check_multiple_of_8(self.scale, "scale")

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """image [3, H, W], label [H, W] -> image [3, 8·i, 8·j], label [H, W] unchanged."""
        h, w = image.shape[1:]
        factor = min(max(self.scale) / max(h, w), min(self.scale) / min(h, w))
        size = (max(8, round(h * factor / 8) * 8), max(8, round(w * factor / 8) * 8))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]  # cv2 INTER_LINEAR
        return image.clamp(-1, 1), label


# ---------------------------------------------------------------------------------------------
# DAFormer's training pipeline (mmseg 0.16), used by DIFF's official GTA5 config:
#     Compose([Resize((1280, 720)), RandomCrop((512, 512), cat_max_ratio=0.75), RandomFlip(),
#              PhotoMetricDistortion()])                        drawn per item inside RareClassSampling


@dataclass(frozen=True)
class Compose:
    """Apply `transforms` in order, all drawing from the one generator."""

    transforms: tuple[Transform, ...]

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        for transform in self.transforms:
            image, label = transform(image, label, generator)
        return image, label


@dataclass(frozen=True)
class Resize:
    """mmseg `Resize(img_scale, keep_ratio=True)` without a ratio range: scale to fit `scale`
    (long, short side) keeping the aspect (GTA5 1914x1052 -> 1280x704 at (1280, 720)); bilinear
    image, nearest label. Draws nothing."""

    scale: tuple[int, int]

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        h, w = image.shape[1:]
        factor = min(max(self.scale) / max(h, w), min(self.scale) / min(h, w))
        return _resize(image, label, (max(1, round(h * factor)), max(1, round(w * factor))))


@dataclass(frozen=True)
class RandomShortEdgeResize:
    """mmseg `RandomChoiceResize` of `ResizeShortestEdge(max_size)`: the short side becomes one of
    `short_edges`, drawn uniformly, unless the long side would exceed `max_long`, which then caps
    it; aspect kept, bilinear image, nearest label. Rein's and QueryDiff's GTA5
    pipeline uses `short_edges_for(512)` = 256, 307, ..., 1024 and `max_long` 2048."""

    short_edges: tuple[int, ...]
    max_long: int = 2048

    def __post_init__(self):
        if not self.short_edges or min(self.short_edges) < 1 or self.max_long < 1:
            raise ValueError(f"short_edges must be positive and non-empty, max_long positive; got {self.short_edges}, {self.max_long}")

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        short = self.short_edges[torch.randint(len(self.short_edges), (), generator=generator).item()]
        h, w = image.shape[1:]
        factor = min(short / min(h, w), self.max_long / max(h, w))
        return _resize(image, label, (max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))))


def short_edges_for(crop: int) -> tuple[int, ...]:
    """The release configs' short sides int(crop · k / 10), k = 5..20 (256..1024 at crop 512)."""
    return tuple(int(crop * k * 0.1) for k in range(5, 21))


@dataclass(frozen=True)
class Rescale:
    """Image and label scaled by `factor` (bicubic antialiased, PIL's BICUBIC / nearest): Rein's and
    QueryDiff's Mapillary validation is scored on images AND labels halved beforehand with PIL
    (mapillary_resize.py)."""

    factor: float = 0.5

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        h, w = image.shape[1:]
        return _resize(image, label, (max(1, int(h * self.factor)), max(1, int(w * self.factor))), "bicubic", antialias=True)  # sides floored, as h // 2


@dataclass(frozen=True)
class RandomCrop:
    """mmseg `RandomCrop(crop_size, cat_max_ratio)` followed by `Pad(crop_size)`: a window of
    `crop` (H, W) (the whole side where the image is smaller) at a uniform place; while the
    window holds fewer than 2 classes or one class covers `cat_max_ratio` or more of its
    non-ignored pixels, draw again, at most `retries` times (the last draw is kept). The result is
    padded to `crop` with 0 (mid grey) and 255 (ignore), unless `pad` is False (then `Pad` last,
    as mmseg 1.x pads in its data preprocessor). `cat_max_ratio = 1` turns the check off."""

    crop: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75
    retries: int = 10
    pad: bool = True

    def __post_init__(self):
        check_multiple_of_8(self.crop, "crop")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")

    def window(self, shape: tuple[int, int], generator: torch.Generator) -> tuple[int, int]:
        """(top, left) of a uniformly placed window."""
        top = torch.randint(max(shape[0] - self.crop[0], 0) + 1, (), generator=generator).item()
        left = torch.randint(max(shape[1] - self.crop[1], 0) + 1, (), generator=generator).item()
        return top, left

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """image [3, H, W], label [H, W] -> image [3, *crop], label [*crop]."""
        (ch, cw), shape = self.crop, label.shape
        top, left = self.window(shape, generator)
        if self.cat_max_ratio < 1:
            for _ in range(self.retries):
                window = label[top : top + ch, left : left + cw]
                counts = torch.bincount(window[window != IGNORE_INDEX])
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = self.window(shape, generator)
        image, label = image[:, top : top + ch, left : left + cw], label[top : top + ch, left : left + cw]
        return Pad(self.crop)(image, label, generator) if self.pad else (image.contiguous(), label.contiguous())


@dataclass(frozen=True)
class Pad:
    """Pad bottom and right to `size` (H, W): the image with the colour `fill` (RGB in [-1, 1]),
    the label with 255 (ignore). QueryDiff's release pads with 0 after ImageNet normalisation,
    i.e. the ImageNet mean colour, `IMAGENET_MEAN`. Draws nothing."""

    size: tuple[int, int]
    fill: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        pad = (0, max(self.size[1] - image.shape[2], 0), 0, max(self.size[0] - image.shape[1], 0))
        out = F.pad(image, pad, value=0.0)
        out[:, image.shape[1] :] = out[:, :, image.shape[2] :] = image.new_tensor(self.fill)[:, None, None]
        return out.contiguous(), F.pad(label, pad, value=IGNORE_INDEX).contiguous()


IMAGENET_MEAN = (2 * 0.485 - 1, 2 * 0.456 - 1, 2 * 0.406 - 1)  # in [-1, 1]


@dataclass(frozen=True)
class RandomFlip:
    """Left-right flip with probability `prob`."""

    prob: float = 0.5

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if torch.rand((), generator=generator).item() < self.prob:
            return image.flip(-1).contiguous(), label.flip(-1).contiguous()
        return image, label


def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """[3, H, W] RGB in [0, 1] -> HSV, each in [0, 1] (hue in turns)."""
    r, g, b = rgb
    v, _ = rgb.max(0)
    c = v - rgb.min(0)[0]
    s = torch.where(v > 0, c / v.clamp_min(1e-12), torch.zeros_like(v))
    cc = c.clamp_min(1e-12)
    h = torch.where(v == r, ((g - b) / cc) % 6, torch.where(v == g, (b - r) / cc + 2, (r - g) / cc + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    return torch.stack([h % 1.0, s, v])


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """The inverse of `rgb_to_hsv`."""
    h, s, v = hsv
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device)[:, None, None] + 6 * h) % 6
    return v - v * s * (torch.minimum(k, 4 - k).clamp(0, 1))


@dataclass(frozen=True)
class PhotoMetricDistortion:
    """mmseg `PhotoMetricDistortion` with its defaults, on [-1, 1] RGB images: each of brightness
    (add U(−δ_b, δ_b) grey levels of 255), contrast (multiply by U(contrast_range)), saturation
    (multiply S by U(saturation_range)) and hue (shift H by an integer in [−δ_h, δ_h) OpenCV units
    of 2°) is applied with probability 1/2, in mmseg's order (contrast first or last, a coin flip),
    clipping to the valid range after each. Differences from mmseg: float arithmetic instead of
    uint8 truncation after each step (at most one grey level per step) and exact HSV instead of
    OpenCV's 8-bit one. The label is untouched."""

    brightness_delta: float = 32.0
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        coin = lambda: torch.randint(2, (), generator=generator).item() == 1  # noqa: E731
        uniform = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=generator).item()  # noqa: E731
        x = (image + 1) * 127.5  # 0..255
        if coin():
            x = (x + uniform(-self.brightness_delta, self.brightness_delta)).clamp(0, 255)
        contrast_last = not coin()  # mmseg: mode 1 -> contrast first, mode 0 -> last
        if not contrast_last and coin():
            x = (x * uniform(*self.contrast_range)).clamp(0, 255)
        if coin():
            hsv = rgb_to_hsv(x / 255)
            hsv[1] = (hsv[1] * uniform(*self.saturation_range)).clamp(0, 1)
            x = hsv_to_rgb(hsv) * 255
        if coin():
            hsv = rgb_to_hsv(x / 255)
            shift = torch.randint(-self.hue_delta, self.hue_delta, (), generator=generator).item() if self.hue_delta else 0
            hsv[0] = (hsv[0] + shift / 180) % 1.0
            x = hsv_to_rgb(hsv) * 255
        if contrast_last and coin():
            x = (x * uniform(*self.contrast_range)).clamp(0, 255)
        return (x / 127.5 - 1).clamp(-1, 1), label


# ---------------------------------------------------------------------------------------------
# Rare-class sampling (DAFormer, Hoyer et al. 2022, eq. 6): P(c) = softmax_c((1 − f_c) / T)


def class_pixel_counts(labels, num_classes: int) -> np.ndarray:
    """Labels (an iterable of [H, W] integer maps, 255 = ignore) -> int64 [N, num_classes]: the
    pixels of each class in each map."""
    rows = []
    for label in labels:
        label = torch.as_tensor(label).flatten()
        rows.append(torch.bincount(label[label < num_classes], minlength=num_classes).numpy())
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0, num_classes), np.int64)


def cached_class_counts(path: Path, keys: list[str], compute: Callable[[], np.ndarray]) -> np.ndarray:
    """`compute()` once, stored at `path` (JSON: the item keys, e.g. label files, and their
    counts); later calls read it back while the keys are the same, else compute again. A
    read-only data folder only costs the recomputation (the error is printed)."""
    path = Path(path)
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("keys") == keys:
            return np.asarray(stored["counts"], np.int64).reshape(len(keys), -1)
    counts = compute()
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"keys": keys, "counts": counts.tolist()}))
    except OSError as err:
        print(f"class statistics not cached ({err}); they will be computed again next time")
    return counts


def rare_class_probabilities(counts: np.ndarray, temperature: float = 0.01) -> np.ndarray:
    """counts [N, C] -> P(c) = softmax((1 − f_c) / T) over the classes present anywhere (0 for
    the others), f_c the class's share of all labelled pixels (DAFormer `get_rcs_class_probs`)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    total = counts.sum(0).astype(np.float64)
    if total.sum() == 0:
        raise ValueError("no labelled pixels: rare-class sampling needs class statistics")
    logits = np.where(total > 0, (1 - total / total.sum()) / temperature, -np.inf)
    p = np.exp(logits - logits.max())
    return p / p.sum()


class RareClassSampling(torch.utils.data.Dataset):
    """DAFormer's rare-class sampling over a dataset with `item(index, generator) -> dict(image,
    label, ...)`: item i draws (from its own (seed, epoch, i) generator) a class c with
    `rare_class_probabilities(counts, temperature)`, then an image holding more than `min_pixels`
    of c (counts at the files' resolution), then up to 10 transformed draws of that image until the
    crop holds more than `min_pixels · min_crop_ratio` pixels of c (the last draw is kept).
    DAFormer's constants: T = 0.01, 3000 pixels, ratio 0.5. Classes that no image holds in that
    quantity are left out (DAFormer asserts instead)."""

    def __init__(self, dataset, counts: np.ndarray, temperature: float = 0.01, min_pixels: int = 3000,
                 min_crop_ratio: float = 0.5, seed: int = 0, retries: int = 10):  # fmt: skip
        if len(counts) != len(dataset):
            raise ValueError(f"counts has {len(counts)} rows for a dataset of {len(dataset)} items")
        self.dataset, self.seed, self.epoch, self.retries = dataset, seed, 0, retries
        self.min_crop_pixels = min_pixels * min_crop_ratio
        p = rare_class_probabilities(counts, temperature) * ((counts > min_pixels).any(0))
        if p.sum() == 0:
            raise ValueError(f"no image holds more than {min_pixels} pixels of any class")
        self.probs = torch.from_numpy(p / p.sum())
        self.images_with = [np.flatnonzero(counts[:, c] > min_pixels) for c in range(counts.shape[1])]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        g = item_generator(self.seed, self.epoch, index)
        c = torch.multinomial(self.probs, 1, generator=g).item()
        images = self.images_with[c]
        source = int(images[torch.randint(len(images), (), generator=g).item()])
        for _ in range(self.retries):
            item = self.dataset.item(source, g)
            if (item["label"] == c).sum().item() > self.min_crop_pixels:
                break
        return item | {"rare_class": c}
