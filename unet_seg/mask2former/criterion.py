"""Mask2Former's set loss for semantic segmentation (Cheng et al. 2022 §3.3; the reference's
`SetCriterion` and `HungarianMatcher`, with mmdet's weights as QueryDiff's config sets them).

Per prediction step (deep supervision: every step, equal weight) and image:

    targets    one binary mask per class present (ignore pixels belong to none)
    matching   Hungarian on  w_cls·(−p_c) + w_bce·BCE + w_dice·Dice,  mask costs on `points`
               UNIFORM random points shared by predictions and targets
    loss       w_cls·CE over all queries (unmatched -> no-object, class weight 0.1)
               + w_bce·BCE + w_dice·Dice of the matched masks at IMPORTANCE-SAMPLED points:
               draw oversample·points uniform candidates, keep the importance·points whose
               predicted logit is closest to 0 (most uncertain) plus uniform ones for the rest.

BCE is the mean over (matched masks × points), Dice (eps 1, not squared) the mean over matched
masks; both count the matched masks of this process's batch (the reference averages that count
over processes). Matching reads the costs on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import dice_loss
from ..matching import linear_sum_assignment


@dataclass(frozen=True)
class SetLossConfig:
    """Weights and point sampling; defaults are Mask2Former's semantic-segmentation config."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


def point_sample(x: Tensor, coords: Tensor) -> Tensor:
    """x [N, C, H, W], coords [N, P, 2] normalised (x, y) in [0, 1] -> [N, C, P], bilinear (align_corners=False)."""
    return F.grid_sample(x, 2 * coords[:, :, None].to(x.dtype) - 1, mode="bilinear", align_corners=False)[..., 0]


def uncertain_points(logits: Tensor, points: int, oversample_ratio: float, importance_sample_ratio: float,
                     generator: Optional[torch.Generator] = None) -> Tensor:  # fmt: skip
    """logits [N, 1, H, W] -> coords [N, points, 2]: the int(importance·points) most uncertain
    (smallest |logit|) of int(oversample·points) uniform candidates, then uniform ones."""
    n, device = logits.shape[0], logits.device
    candidates = torch.rand(n, int(points * oversample_ratio), 2, device=device, generator=generator)
    uncertainty = -point_sample(logits.detach(), candidates)[:, 0].abs()
    important = int(importance_sample_ratio * points)
    index = uncertainty.topk(important, dim=1).indices
    chosen = candidates.gather(1, index[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, points - important, 2, device=device, generator=generator)
    return torch.cat([chosen, rest], dim=1)


def semantic_targets(labels: Tensor, ignore_index: int = 255) -> tuple[list[Tensor], list[Tensor]]:
    """labels [B, H, W] -> per image (classes present [T] long, masks [T, H, W] float)."""
    classes, masks = [], []
    for lab in labels:
        present = lab.unique()
        present = present[present != ignore_index]
        classes.append(present)
        masks.append((lab[None] == present[:, None, None]).float())
    return classes, masks


@torch.no_grad()
def match(cls: Tensor, mask_logits: Tensor, classes: Tensor, masks: Tensor, cfg: SetLossConfig,
          generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One image: cls [Q, K+1], mask_logits [Q, h, w], targets classes [T], masks [T, H, W]
    -> (query indices, target indices), T pairs."""
    coords = torch.rand(1, cfg.points, 2, device=cls.device, generator=generator)
    x = point_sample(mask_logits[None].float(), coords)[0]  # [Q, P]
    t = point_sample(masks[None], coords)[0]  # [T, P]
    cost_cls = -cls.float().softmax(-1)[:, classes]
    cost_bce = (F.softplus(-x) @ t.T + F.softplus(x) @ (1 - t).T) / cfg.points
    s = x.sigmoid()
    cost_dice = 1 - (2 * s @ t.T + 1) / (s.sum(-1)[:, None] + t.sum(-1)[None] + 1)
    cost = cfg.class_weight * cost_cls + cfg.mask_weight * cost_bce + cfg.dice_weight * cost_dice  # [Q, T]
    q_idx, t_idx = linear_sum_assignment(cost)
    return q_idx.to(cls.device), t_idx.to(cls.device)


def set_loss(all_cls: Sequence[Tensor], all_masks: Sequence[Tensor], classes: Sequence[Tensor], masks: Sequence[Tensor],
             num_classes: int, cfg: SetLossConfig = SetLossConfig(), generator: Optional[torch.Generator] = None) -> Tensor:  # fmt: skip
    """Σ over prediction steps of the matched set loss (module docstring).

    all_cls: per step [B, Q, K+1]; all_masks: per step [B, Q, h, w] (any resolution: points are
    normalised); classes / masks: per image the targets of `semantic_targets`. -> scalar float32.
    """
    if len(all_cls) != len(all_masks) or not all_cls:
        raise ValueError(f"need as many class as mask predictions (>= 1), got {len(all_cls)} and {len(all_masks)}")
    b = all_cls[0].shape[0]
    if len(classes) != b or len(masks) != b:
        raise ValueError(f"expected targets for {b} images, got {len(classes)} / {len(masks)}")
    device = all_cls[0].device
    class_weight = torch.ones(num_classes + 1, device=device)
    class_weight[-1] = cfg.no_object_weight
    num_masks = max(sum(len(c) for c in classes), 1)
    total = torch.zeros((), device=device)
    for cls, mask_logits in zip(all_cls, all_masks):
        cls = cls.float()
        target_cls = torch.full(cls.shape[:2], num_classes, dtype=torch.long, device=device)
        pred, tgt = [], []
        for i in range(b):
            if len(classes[i]) == 0:
                continue
            q_idx, t_idx = match(cls[i], mask_logits[i], classes[i], masks[i], cfg, generator)
            target_cls[i, q_idx] = classes[i][t_idx]
            pred.append(mask_logits[i, q_idx])
            tgt.append(masks[i][t_idx])
        total = total + cfg.class_weight * F.cross_entropy(cls.transpose(1, 2), target_cls, weight=class_weight)
        if pred:
            p = torch.cat(pred)[:, None].float()  # [N, 1, h, w], N matched masks of the batch
            coords = uncertain_points(p, cfg.points, cfg.oversample_ratio, cfg.importance_sample_ratio, generator)
            x = point_sample(p, coords)[:, 0]
            y = point_sample(torch.cat(tgt)[:, None], coords)[:, 0]
            bce = F.binary_cross_entropy_with_logits(x, y, reduction="sum") / cfg.points
            total = total + (cfg.mask_weight * bce + cfg.dice_weight * dice_loss(x, y) * len(x)) / num_masks
    return total
