"""Prototype few-shot segmentation primitives (PANet, Wang et al., ICCV 2019, §3.2–3.3), plain
functions on tensors:

    protos = fg_bg_prototypes(support_feats, support_masks)   # [B, 2, C]: background, foreground
    logits = cosine_logits(query_feats, protos, scale=20.0)   # [B, 2, h, w]; argmax 1 = foreground

`masked_average_pool` is PANet's eq. 1 (masked average pooling): the mean of the features under
a mask, the mask resized to the features by area averaging (a pixel of a coarse map weighs by
how much of it the mask covers), mask pixels equal to `ignore_index` weighing 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mask_weights(mask: Tensor, size: tuple[int, int], ignore_index: int = 255) -> Tensor:
    """mask [..., H, W] ({0, 1} integers with `ignore_index`, or soft weights in [0, 1]) ->
    weights [..., *size] float32: the area-averaged mask, ignored pixels counting as 0."""
    if mask.ndim < 2:
        raise ValueError(f"mask must be [..., H, W], got shape {tuple(mask.shape)}")
    m = mask.float() if mask.is_floating_point() else torch.where(mask == ignore_index, 0, mask).float()
    lead = m.shape[:-2]
    m = m.reshape(-1, 1, *m.shape[-2:])
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode="area")
    return m.reshape(*lead, *size)


def masked_average_pool(feats: Tensor, mask: Tensor, ignore_index: int = 255, eps: float = 1e-6) -> Tensor:
    """PANet eq. 1: feats [..., C, h, w], mask [..., H, W] -> [..., C] = Σ_p w_p·f_p / Σ_p w_p,
    w = `mask_weights(mask, (h, w))`; a zero vector where the mask is empty (Σ w < eps)."""
    if feats.ndim < 3 or feats.shape[:-3] != mask.shape[:-2]:
        raise ValueError(f"feats [..., C, h, w] and mask [..., H, W] must share leading dims, got {tuple(feats.shape)}, {tuple(mask.shape)}")
    w = mask_weights(mask, feats.shape[-2:], ignore_index).to(feats.dtype)
    total = (feats * w.unsqueeze(-3)).sum((-2, -1))
    return total / w.sum((-2, -1)).clamp_min(eps).unsqueeze(-1)


def fg_bg_prototypes(feats: Tensor, masks: Tensor, ignore_index: int = 255) -> Tensor:
    """Support features [B, S, C, h, w] and masks [B, S, H, W] in {0, 1, ignore} -> prototypes
    [B, 2, C]: (background, foreground), each the mean over the S shots of the shot's masked
    average (PANet eq. 1–2). Ignored pixels belong to neither."""
    if feats.ndim != 5 or masks.ndim != 4 or feats.shape[:2] != masks.shape[:2]:
        raise ValueError(f"feats must be [B, S, C, h, w] and masks [B, S, H, W], got {tuple(feats.shape)}, {tuple(masks.shape)}")
    if masks.is_floating_point():
        raise TypeError(f"masks must hold integer labels {{0, 1, {ignore_index}}}, got {masks.dtype}")
    background = torch.where(masks == ignore_index, ignore_index, 1 - masks)
    fg = masked_average_pool(feats, masks, ignore_index).mean(1)
    bg = masked_average_pool(feats, background, ignore_index).mean(1)
    return torch.stack([bg, fg], 1)


def cosine_logits(feats: Tensor, prototypes: Tensor, scale: float = 20.0, eps: float = 1e-8) -> Tensor:
    """PANet eq. 3: feats [B, C, h, w], prototypes [B, P, C] -> logits [B, P, h, w] =
    scale · cos(f_xy, p_j) (PANet: scale α = 20); softmax over P gives the class probabilities."""
    if feats.ndim != 4 or prototypes.ndim != 3 or prototypes.shape[0] != feats.shape[0] or prototypes.shape[2] != feats.shape[1]:
        raise ValueError(f"feats must be [B, C, h, w] and prototypes [B, P, C], got {tuple(feats.shape)}, {tuple(prototypes.shape)}")
    f = F.normalize(feats, dim=1, eps=eps)
    p = F.normalize(prototypes, dim=2, eps=eps)
    return scale * torch.einsum("bchw,bpc->bphw", f, p)
