"""Masks and label maps <-> 3-channel images in [-1, 1] <-> SD VAE latents.

The image-space half is exact arithmetic; the latent half is one VAE call on top of it. `vae` is
anything with `encode(img [B, 3, H, W] in [-1, 1]) -> scaled latent [B, 4, H/8, W/8]` and
`decode(z) -> img ≈ [-1, 1]` (`unet_seg.models.vae.AutoencoderKL`, or the weight-free
`unet_seg.demo.BlockCodec` that CPU demos use in its place).

Binary masks: an encoding paints the foreground rendering where the mask is 1 and the
background rendering elsewhere,

    x = background + m · (foreground − background)                     [B, 3, H, W]

and decoding projects each pixel back onto that segment, p = ⟨x − bg, fg − bg⟩ / ‖fg − bg‖²,
clamped to [0, 1]. The four encodings DiffewS compares (its Fig. 5; "a" is its best):

    (a) white on black           mask_to_image(m)                        fg = 1,         bg = −1
    (b) real foreground on black mask_to_image(m, image, -1.0)           fg = image,     bg = −1
    (c) black on real background mask_to_image(m, -1.0, image)           fg = −1,        bg = image
    (d) mask overlaid on image   mask_to_image(m, tinted, image)         fg = tinted,    bg = image

with tinted = (image + red) / 2, red = (1, −1, −1) as a [1, 3, 1, 1] tensor. For (a) the
projection is exactly the channel mean mapped to [0, 1]: p = (mean_c x + 1) / 2.
Pixels where fg = bg (say a black image pixel under (b)) carry no mask and decode to 0.
Probabilities become masks with an absolute threshold (`p > τ`) or DiffewS' relative one
(`p > r · max p` per image on the 8-bit decoded image, r = 0.25: `binarise` in its recipe).

Label maps [B, H, W] (classes 0..C−1, `ignore_index` 255):

  - per class (DiGSeg): one binary mask per class, each through the VAE; back by a pixel-wise
    argmax over the class probabilities, and a background label where the best is below τ_bg.
  - colour palette (DiGSeg appendix B, LDMSeg-style): class c painted in `palette[c]`, decoded
    by the nearest palette colour. Ignore pixels are painted `IGNORE_COLOUR` (mid grey, which
    `make_palette` never uses) and decode back to `ignore_index`.

Input checks read tensor values (one host sync each on a GPU): call codecs in data pipelines
and evaluation, not inside a compiled forward. Where the masks were already checked (say with
`check_mask` on the CPU batch a data loader yields), `check=False` skips the value check, so a
GPU episode runs without waiting on the host.
"""

from __future__ import annotations

import functools
import math
from typing import Union

import torch
from torch import Tensor

from .checks import check_images, check_multiple_of_8

Rendering = Union[Tensor, float]

IGNORE_COLOUR = (0.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# Binary masks <-> images


def mask_to_image(mask: Tensor, foreground: Rendering = 1.0, background: Rendering = -1.0, check: bool = True) -> Tensor:
    """mask [B, H, W] with values in {0, 1, 255} -> image [B, 3, H, W] in [-1, 1].

    x = fg where m = 1, bg elsewhere; fg and bg are floats or [B, 3, H, W] images. Ignore
    pixels (255) are painted as background. Output dtype: that of the image renderings, else
    the mask's if it is floating point, else float32. `check=False` skips the value check (for
    masks that passed `check_mask` already); any value other than 1 is then background.
    """
    m = _binary_mask(mask, "mask", check).unsqueeze(1).expand(-1, 3, -1, -1)
    fg, bg = _renderings(mask, foreground, background)
    return torch.where(m, fg, bg)


def image_to_probability(image: Tensor, foreground: Rendering = 1.0, background: Rendering = -1.0) -> Tensor:
    """image [B, 3, H, W] (e.g. decoded) -> foreground probability [B, H, W] in [0, 1].

    p = clamp(⟨x − bg, fg − bg⟩ / ‖fg − bg‖², 0, 1) per pixel, with the renderings the mask was
    encoded with; for white on black this is (mean_c x + 1) / 2.
    """
    check_images(image, "image")
    fg, bg = _renderings(image[:, 0], foreground, background, dtype=image.dtype)
    direction = (fg - bg).expand_as(image)
    along = ((image - bg) * direction).sum(1)
    length2 = direction.square().sum(1)
    p = torch.where(length2 > 0, along / length2.clamp(min=torch.finfo(image.dtype).tiny), 0.0)
    return p.clamp(0.0, 1.0)


def mask_to_latent(vae, mask: Tensor, foreground: Rendering = 1.0, background: Rendering = -1.0, check: bool = True) -> Tensor:
    """mask [B, H, W] (H, W multiples of 8) -> scaled latent [B, 4, H/8, W/8] (`check`: see `mask_to_image`)."""
    _check_maps(mask, "mask")
    return vae.encode(mask_to_image(mask, foreground, background, check))


def latent_to_probability(vae, z: Tensor, foreground: Rendering = 1.0, background: Rendering = -1.0) -> Tensor:
    """Scaled latent [B, 4, h, w] -> foreground probability [B, 8h, 8w] in [0, 1]."""
    return image_to_probability(vae.decode(z), foreground, background)


# ---------------------------------------------------------------------------------------------
# Label maps, one binary mask per class (DiGSeg)


def label_map_to_masks(labels: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """labels [B, H, W] in {0..C−1, ignore_index} -> masks [B, C, H, W] int64 in {0, 1}.

    Ignore pixels are 0 in every class mask (they decode to the background label).
    """
    _check_labels(labels, num_classes, ignore_index)
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1, 1)
    return (labels.unsqueeze(1) == classes).long()


def masks_to_label_map(prob: Tensor, background_label: int, background_threshold: float = 0.7) -> Tensor:
    """Class probabilities [B, C, H, W] -> labels [B, H, W] int64 (DiGSeg, appendix A.3):

        ŷ(i, j) = argmax_c M_c(i, j),   or background_label where max_c M_c(i, j) < τ_bg.

    Default τ_bg = 0.7, DiGSeg's τ. Map the argmax index to dataset ids with `class_ids[ŷ]`.
    """
    if prob.ndim != 4 or not prob.is_floating_point():
        raise ValueError(f"prob must be floating point [B, C, H, W], got {prob.dtype} {tuple(prob.shape)}")
    best, label = prob.max(dim=1)
    return torch.where(best < background_threshold, background_label, label)


def label_map_to_latents(vae, labels: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """labels [B, H, W] -> per-class white-on-black latents [B, C, 4, H/8, W/8] (B·C VAE images)."""
    _check_maps(labels, "labels")
    masks = label_map_to_masks(labels, num_classes, ignore_index)
    z = mask_to_latent(vae, masks.flatten(0, 1))
    return z.unflatten(0, masks.shape[:2])


def latents_to_label_map(vae, z: Tensor, background_label: int, background_threshold: float = 0.7) -> Tensor:
    """Per-class latents [B, C, 4, h, w] -> labels [B, 8h, 8w] int64 (argmax + background)."""
    if z.ndim != 5:
        raise ValueError(f"z must be per-class latents [B, C, 4, h, w], got shape {tuple(z.shape)}")
    prob = latent_to_probability(vae, z.flatten(0, 1)).unflatten(0, z.shape[:2])
    return masks_to_label_map(prob, background_label, background_threshold)


# ---------------------------------------------------------------------------------------------
# Label maps, colour palette (DiGSeg appendix B, LDMSeg)


def make_palette(num_classes: int) -> Tensor:
    """num_classes well-separated colours [C, 3] float32 in [−1, 1]: the first C points of a
    k×k×k grid, k the smallest even number with k³ ≥ C (even k keeps mid grey, the ignore
    colour, off the grid). Neighbouring colours are 2/(k−1) apart per channel."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    k = max(2, math.ceil(num_classes ** (1 / 3)))
    k += k % 2
    while k**3 < num_classes:  # guards ceil against float error in the cube root
        k += 2
    levels = torch.linspace(-1.0, 1.0, k)
    grid = torch.cartesian_prod(levels, levels, levels)
    return grid[:num_classes].contiguous()


def labels_to_palette_image(labels: Tensor, palette: Tensor, ignore_index: int = 255) -> Tensor:
    """labels [B, H, W] in {0..C−1, ignore_index} -> image [B, 3, H, W] (palette's dtype,
    labels' device): class c painted palette[c] ([C, 3]), ignore pixels `IGNORE_COLOUR`."""
    colours = _palette_with_ignore(palette).to(labels.device)
    _check_labels(labels, palette.shape[0], ignore_index)
    index = torch.where(labels == ignore_index, palette.shape[0], labels)
    return colours[index].permute(0, 3, 1, 2)


def palette_image_to_labels(image: Tensor, palette: Tensor, ignore_index: int = 255) -> Tensor:
    """image [B, 3, H, W] -> labels [B, H, W] int64: the nearest (Euclidean) of the palette
    colours and `IGNORE_COLOUR`; the latter decodes to ignore_index."""
    check_images(image, "image")
    colours = _palette_with_ignore(palette).to(device=image.device, dtype=image.dtype)
    d2 = (image.unsqueeze(1) - colours.view(1, -1, 3, 1, 1)).square().sum(2)  # [B, C+1, H, W]
    index = d2.argmin(1)
    return torch.where(index == palette.shape[0], ignore_index, index)


def labels_to_palette_latent(vae, labels: Tensor, palette: Tensor, ignore_index: int = 255) -> Tensor:
    """labels [B, H, W] (H, W multiples of 8) -> scaled latent [B, 4, H/8, W/8]."""
    _check_maps(labels, "labels")
    return vae.encode(labels_to_palette_image(labels, palette, ignore_index))


def palette_latent_to_labels(vae, z: Tensor, palette: Tensor, ignore_index: int = 255) -> Tensor:
    """Scaled latent [B, 4, h, w] -> labels [B, 8h, 8w] int64 by nearest palette colour."""
    return palette_image_to_labels(vae.decode(z), palette, ignore_index)


# ---------------------------------------------------------------------------------------------
# Checks


def _renderings(like: Tensor, foreground: Rendering, background: Rendering, dtype=None) -> tuple[Tensor, Tensor]:
    """fg, bg as tensors broadcastable to [B, 3, H, W] on like's device, in one float dtype."""
    images = [r for r in (foreground, background) if isinstance(r, Tensor)]
    for r, name in ((foreground, "foreground"), (background, "background")):
        if isinstance(r, Tensor):
            check_images(r, name)
            if (r.shape[0], *r.shape[2:]) != tuple(like.shape):
                raise ValueError(f"{name} must be [B, 3, H, W] matching {tuple(like.shape)}, got {tuple(r.shape)}")
    if dtype is None:
        floats = [r.dtype for r in images] or [like.dtype if like.is_floating_point() else torch.float32]
        dtype = functools.reduce(torch.promote_types, floats)

    def as_tensor(r: Rendering) -> Tensor:
        if isinstance(r, Tensor):
            return r.to(dtype)
        return torch.full((1, 1, 1, 1), float(r), dtype=dtype, device=like.device)

    return as_tensor(foreground), as_tensor(background)


def check_mask(mask: Tensor, name: str = "mask") -> None:
    """Raise ValueError / TypeError unless `mask` is [B, H, W] (bool, integer or float) holding
    only 0, 1 and 255 (ignore). Reads the values: one host sync for a mask on a GPU."""
    _binary_mask(mask, name)


def _binary_mask(mask: Tensor, name: str, check: bool = True) -> Tensor:
    """{0, 1, 255} mask -> bool foreground (255 -> False), after checking shape (and, with
    `check`, values)."""
    if mask.ndim != 3:
        raise ValueError(f"{name} must be [B, H, W], got shape {tuple(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool, integer or float, got {mask.dtype}")
    is_one = mask == 1
    if check:
        is_ignore = mask == 255
        if not ((mask == 0) | is_one | is_ignore).all():
            bad = mask[(mask != 0) & ~is_one & ~is_ignore].unique()[:5].tolist()
            raise ValueError(f"{name} must hold 0/1 (255 = ignore), found values {bad}")
    return is_one


def _check_labels(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    if labels.ndim != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bad.any():
        raise ValueError(
            f"labels must be in [0, {num_classes}) or {ignore_index} (ignore), "
            f"found {labels[bad].unique()[:5].tolist()}"
        )


def _check_maps(x: Tensor, name: str) -> None:
    """Masks or label maps [B, H, W] that the VAE can take."""
    if x.ndim != 3:
        raise ValueError(f"{name} must be [B, H, W], got shape {tuple(x.shape)}")
    check_multiple_of_8(x.shape[1:], name)


def _palette_with_ignore(palette: Tensor) -> Tensor:
    """palette [C, 3] in [−1, 1] -> [C + 1, 3] with IGNORE_COLOUR appended."""
    if palette.ndim != 2 or palette.shape[1] != 3 or not palette.is_floating_point():
        raise ValueError(f"palette must be floating point [C, 3], got {palette.dtype} {tuple(palette.shape)}")
    ignore = torch.tensor(IGNORE_COLOUR, dtype=palette.dtype, device=palette.device)
    if (palette.abs() > 1).any() or (palette == ignore).all(1).any():
        raise ValueError(f"palette colours must lie in [-1, 1] and differ from the ignore colour {IGNORE_COLOUR}")
    return torch.cat([palette, ignore[None]])
