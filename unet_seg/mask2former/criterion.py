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
over processes).

Shapes stay fixed whatever the labels hold: targets are one mask per class of the vocabulary
with a flag for the classes present, and all images × prediction steps are matched at once on
the device (`matching.min_cost_assignment`), absent classes taking no query. No host sync, so a
training step with this loss can be replayed as one CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import dice_loss
from ..matching import min_cost_assignment
from ..models.layers import capturing


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


def check_class_ids(labels: Tensor, num_classes: int, ignore_index: int = 255) -> None:
    """Raise unless `labels` [B, H, W] are integer class ids in 0..K-1 or `ignore_index` (reads
    them on the host: a CUDA graph's replays check nothing, so check the loader's CPU labels)."""
    if labels.ndim != 3 or labels.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ValueError(f"labels must be class ids [B, H, W], got {labels.dtype} {tuple(labels.shape)}")
    bad = (labels >= num_classes) & (labels != ignore_index) | (labels < 0)
    if bad.any():
        raise ValueError(f"labels hold class ids outside 0..{num_classes - 1} (and {ignore_index}, ignored): {labels[bad].unique().tolist()}")


def semantic_targets(labels: Tensor, num_classes: int, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """labels [B, H, W] (0..K-1, or `ignore_index`) -> (present [B, K] bool, masks [B, K, H, W]
    float): one binary mask per class, present where it has a pixel; ignore pixels belong to none."""
    if not capturing(labels):
        check_class_ids(labels, num_classes, ignore_index)
    masks = labels[:, None] == torch.arange(num_classes, device=labels.device)[:, None, None]
    return masks.flatten(2).any(-1), masks.float()


@torch.no_grad()
def match(all_cls: Sequence[Tensor], all_masks: Sequence[Tensor], present: Tensor, masks: Tensor, cfg: SetLossConfig,
          generator: Optional[torch.Generator] = None) -> Tensor:  # fmt: skip
    """Per prediction step: cls [B, Q, K+1], mask_logits [B, Q, h, w]; targets `semantic_targets`
    -> query of each (step, image, class) [S, B, K], -1 where the class is absent. Costs on
    `cfg.points` uniform points per step and image."""
    costs = []
    for cls, mask_logits in zip(all_cls, all_masks):
        b = cls.shape[0]
        coords = torch.rand(b, cfg.points, 2, device=cls.device, generator=generator)
        x = point_sample(mask_logits.float(), coords)  # [B, Q, P]
        t = point_sample(masks, coords)  # [B, K, P]
        cost_cls = -cls.float().softmax(-1)[..., :-1]  # [B, Q, K]
        cost_bce = (F.softplus(-x) @ t.transpose(1, 2) + F.softplus(x) @ (1 - t).transpose(1, 2)) / cfg.points
        s = x.sigmoid()
        cost_dice = 1 - (2 * s @ t.transpose(1, 2) + 1) / (s.sum(-1)[..., None] + t.sum(-1)[:, None] + 1)
        costs.append((cfg.class_weight * cost_cls + cfg.mask_weight * cost_bce + cfg.dice_weight * cost_dice).transpose(1, 2))  # [B, K, Q]
    steps = len(costs)
    return min_cost_assignment(torch.cat(costs), present.repeat(steps, 1)).view(steps, *present.shape)


def set_loss(all_cls: Sequence[Tensor], all_masks: Sequence[Tensor], present: Tensor, masks: Tensor,
             cfg: SetLossConfig = SetLossConfig(), generator: Optional[torch.Generator] = None) -> Tensor:  # fmt: skip
    """Σ over prediction steps of the matched set loss (module docstring).

    all_cls: per step [B, Q, K+1]; all_masks: per step [B, Q, h, w] (any resolution: points are
    normalised); present [B, K], masks [B, K, H, W]: the targets of `semantic_targets`. -> scalar float32.
    """
    if len(all_cls) != len(all_masks) or not all_cls:
        raise ValueError(f"need as many class as mask predictions (>= 1), got {len(all_cls)} and {len(all_masks)}")
    (b, q, k1), k = all_cls[0].shape, masks.shape[1]
    if present.shape != (b, k) or masks.ndim != 4 or masks.shape[0] != b or k1 != k + 1:
        raise ValueError(f"class logits [{b}, Q, K+1] need targets present [{b}, K] and masks [{b}, K, H, W], got "
                         f"{tuple(all_cls[0].shape)}, {tuple(present.shape)} and {tuple(masks.shape)}")  # fmt: skip
    device = all_cls[0].device
    class_weight = torch.cat([torch.ones(k, device=device), torch.full((1,), cfg.no_object_weight, device=device)])  # fills: no host copy
    matched = present.flatten().float()  # [B·K] weights of the (image, class) masks: 0 for an absent class
    num_masks = matched.sum().clamp(min=1)
    queries = match(all_cls, all_masks, present, masks, cfg, generator)  # [S, B, K]
    target_masks = masks.flatten(0, 1)[:, None]  # [B·K, 1, H, W]
    total = torch.zeros((), device=device)
    for cls, mask_logits, query in zip(all_cls, all_masks, queries):
        cls = cls.float()
        # class targets: the matched queries their class, the rest (and a spare column for absent classes) no-object
        target_cls = torch.full((b, q + 1), k, dtype=torch.long, device=device)
        target_cls = target_cls.scatter(1, torch.where(present, query, q), torch.arange(k, device=device).expand(b, k))[:, :q]
        total = total + cfg.class_weight * F.cross_entropy(cls.transpose(1, 2), target_cls, weight=class_weight)
        p = mask_logits.gather(1, query.clamp(min=0)[..., None, None].expand(-1, -1, *mask_logits.shape[2:]))  # [B, K, h, w]
        p = p.flatten(0, 1)[:, None].float()  # [B·K, 1, h, w]: an absent class's row is some query, weighted 0
        coords = uncertain_points(p, cfg.points, cfg.oversample_ratio, cfg.importance_sample_ratio, generator)
        x = point_sample(p, coords)[:, 0]
        y = point_sample(target_masks, coords)[:, 0]
        bce = F.binary_cross_entropy_with_logits(x, y, reduction="none").mean(1)
        total = total + ((cfg.mask_weight * bce + cfg.dice_weight * dice_loss(x, y, reduction="none")) * matched).sum() / num_masks
    return total
