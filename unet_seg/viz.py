"""PNG pictures for people: label maps over images, and grids of panels.

    panels = [image_to_uint8(query), *map(image_to_uint8, supports), overlay(query, pred), overlay(query, gt)]
    save_grid([panels], "episodes.png", titles=["query", "support", "prediction", "ground truth"], scale=4)

Panels are numpy uint8 [H, W, 3]. Labels use `PALETTE`: 0 (background) black and left
untinted by `overlay`, ids 1..254 saturated colours that step round the hue circle by the golden
ratio (neighbouring ids far apart, none of them grey), 255 (ignore) mid grey `IGNORE_GREY`.
"""

from __future__ import annotations

import colorsys
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .checks import describe
from .files import atomic_path
from .train import PathLike, is_main

IGNORE_INDEX = 255
IGNORE_GREY = (128, 128, 128)


def _palette() -> np.ndarray:
    colours = [(0, 0, 0)]
    for c in range(1, IGNORE_INDEX):
        hue = (c * 0.6180339887) % 1.0
        saturation = 0.9 if c % 2 else 0.65
        value = 1.0 if (c // 2) % 2 == 0 else 0.75
        colours.append(tuple(round(255 * x) for x in colorsys.hsv_to_rgb(hue, saturation, value)))
    colours.append(IGNORE_GREY)
    return np.array(colours, dtype=np.uint8)


PALETTE = _palette()  # [256, 3] uint8; row c is the colour of label c


def image_to_uint8(image: Tensor) -> np.ndarray:
    """image [3, H, W] float in [-1, 1] (values outside are clipped) -> uint8 [H, W, 3]."""
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor [3, H, W] in [-1, 1], got {describe(image)}")
    x = ((image.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(1, 2, 0).numpy()


def overlay(image: Tensor, labels: Tensor, palette: Optional[np.ndarray] = None, alpha: float = 0.5) -> np.ndarray:
    """image [3, H, W] in [-1, 1], labels [H, W] (integer label map or binary mask, bool or
    ints in {0..K−1, 255}) -> uint8 [H, W, 3]: every non-zero label blended with its colour,

        out = (1 − α) · image + α · palette[label]       where label ≠ 0, image elsewhere,

    ignore (255) blended with grey. `palette`: uint8 [K, 3] for labels 0..K−1, default `PALETTE`.
    """
    rgb = image_to_uint8(image)
    if not isinstance(labels, Tensor) or labels.ndim != 2 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"labels must be an integer or bool tensor [H, W] (threshold probabilities first), got {describe(labels)}"
        )
    if tuple(labels.shape) != rgb.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} and image {rgb.shape[:2]} must have the same H, W")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = PALETTE if palette is None else np.asarray(palette)
    if colours.dtype != np.uint8 or colours.ndim != 2 or colours.shape[1] != 3 or not 1 <= len(colours) <= 256:
        raise ValueError(f"palette must be uint8 [K, 3] with 1 <= K <= 256, got {colours.dtype} {colours.shape}")
    lab = labels.detach().cpu().long().numpy()
    valid = ((lab >= 0) & (lab < len(colours))) | (lab == IGNORE_INDEX)
    if not valid.all():
        found = np.unique(lab[~valid])[:5].tolist()
        raise ValueError(f"labels must be in [0, {len(colours)}) or {IGNORE_INDEX}, found {found}")
    colours = np.concatenate([colours, np.zeros((256 - len(colours), 3), np.uint8)])
    colours[IGNORE_INDEX] = IGNORE_GREY
    blended = (1 - alpha) * rgb + alpha * colours[lab].astype(np.float64)
    return np.where((lab != 0)[..., None], blended.round(), rgb).astype(np.uint8)


def save_grid(
    rows: Sequence[Sequence[np.ndarray]], path: PathLike, titles: Optional[Sequence[str]] = None, scale: int = 1
) -> None:
    """Write panels (uint8 [H, W, 3] each; rows may differ in length) as one PNG at `path`,
    atomically: row r is a line of the picture, each panel enlarged `scale` times (nearest)
    in a cell of the largest panel's size, 2-pixel gaps; `titles` label the columns above the
    first row (PIL's default font). Only rank 0 writes, as `train.write_metrics`: call it on every rank."""
    if len(rows) == 0 or any(len(row) == 0 for row in rows):
        raise ValueError("rows must be a non-empty sequence of non-empty sequences of panels")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            if not isinstance(panel, np.ndarray) or panel.dtype != np.uint8 or panel.ndim != 3 or panel.shape[2] != 3:
                raise ValueError(f"panel ({r}, {c}) must be a numpy uint8 [H, W, 3] array, got {describe(panel)}")
    if not is_main():
        return
    gap = 2
    cell_h = max(p.shape[0] for row in rows for p in row) * scale
    cell_w = max(p.shape[1] for row in rows for p in row) * scale
    columns = max(len(row) for row in rows)
    font = ImageFont.load_default()
    title_h = font.getbbox("Ag")[3] + 2 * gap if titles else 0
    width = columns * cell_w + (columns + 1) * gap
    height = title_h + len(rows) * cell_h + (len(rows) + 1) * gap
    canvas = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles or ()):
        draw.text((gap + c * (cell_w + gap), gap), str(title), fill=(235, 235, 235), font=font)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            big = panel.repeat(scale, axis=0).repeat(scale, axis=1)
            canvas.paste(Image.fromarray(big), (gap + c * (cell_w + gap), title_h + gap + r * (cell_h + gap)))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
