"""Losses as plain functions on tensors; each returns a scalar, averaged as its docstring says.

    consistency_l2, consistency_kl     DIFF's IPKL: conditional teacher -> unconditional student
    diffusion_consistency_loss         QueryDiff's DCL: (L_dist, L_sup)
    cross_entropy, dice_loss           segmentation (CE with ignore index; Mask2Former-style Dice)
    latent_mse                         generative formulations (DiffewS, DiGSeg: latent targets)
    check_finite                       NaN/inf guard for training loops (syncs with the device)

The losses themselves never branch on tensor values, so they compile without graph breaks;
NaN or inf in their inputs propagates into the loss unchanged. `check_finite` is the one place
that looks at a value and raises, naming the loss; it belongs outside compiled code.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_same_shape


def consistency_l2(student: Tensor, teacher: Tensor, detach_teacher: bool = True) -> Tensor:
    """DIFF eq. 4, L_consis = ‖D(F_cond) − D(F_uncond)‖₂, as the mean squared difference over
    all elements (so λ₂ = 1 does not scale with resolution).

    student: unconditional-branch output, teacher: conditional-branch output, same shape (the
    segmentation head's logits [B, C, H, W] in DIFF). `detach_teacher` stops gradients into the
    teacher branch; the paper shares the trainable weights of both branches and does not say.
    """
    check_same_shape(student, teacher, "student", "teacher")
    return F.mse_loss(student, teacher.detach() if detach_teacher else teacher)


def consistency_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    detach_teacher: bool = True,
    temperature: float = 1.0,
    reduction: str = "mean",
    weight: float = 1.0,
    max_value: Optional[float] = None,
) -> Tensor:
    """The KL variant of DIFF's consistency loss (its Table IV; the paper gives no equation):
    forward KL from the conditional teacher to the unconditional student, the usual
    distillation direction, with softmax over the class dim (dim 1) at temperature T:

        L = T² · Σ_c p_t,c · (log p_t,c − log p_s,c),  p = softmax(logits / T, dim=1)

    reduced by "mean" over (b, h, w) or "batchmean" (summed over positions, divided by B: PyTorch
    `kl_div`'s, as the official `kl_loss`), multiplied by `weight`, and THEN clamped from above at
    `max_value` if given (the official order: weight 0.1 with max_value 0.5 cuts the KL at 5; no
    gradient while the weighted loss exceeds the cap). Official arguments (commented out in its
    `forward_train`): T = 1, "batchmean", weight 0.1, max_value 0.5, teacher not detached.
    logits [B, C, ...] for both branches. `detach_teacher` as in `consistency_l2`.
    """
    check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    if student_logits.ndim < 2:
        raise ValueError(f"logits must be [B, C, ...], got shape {tuple(student_logits.shape)}")
    if reduction not in ("mean", "batchmean"):
        raise ValueError(f"reduction must be 'mean' or 'batchmean', got {reduction!r}")
    teacher = teacher_logits.detach() if detach_teacher else teacher_logits
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1)
    loss = (kl.mean() if reduction == "mean" else kl.sum() / kl.shape[0]) * (weight * temperature**2)
    return loss if max_value is None else loss.clamp(max=max_value)


def diffusion_consistency_loss(queries: Tensor, weak: Tensor, strong: Tensor) -> tuple[Tensor, Tensor]:
    """QueryDiff's Diffusion Consistency Loss, returned as (L_dist, L_sup); L_DCL = L_sup + L_dist.

    queries q [B, r, d] (agent queries), weak F_w and strong F_s [B, d, h, w]: diffusion features
    at a weak and a strong noise level, already projected to the query width d. With N = h·w and
    F as [B, d, N]:

        S   = q F_w / √d                         [B, r, N]  similarity of agents and weak features
        F̂   = qᵀ softmax_r(S)                    [B, d, N]  strong features rebuilt from S: each
                                                            pixel a convex mix of the agents
        L_dist = mean_{b,c} KL( softmax_N(F_s[b, c]) ‖ softmax_N(F̂[b, c]) )
        q̂   = softmax_N(S) F_sᵀ                  [B, r, d]  agents updated through the cleaned map
        L_sup  = mean ‖q − sg(q̂)‖²

    The source notes (querydiff-blog) describe these steps but their equation images are lost;
    the forms above are our reading and the choices in it are ours: KL over each channel's
    spatial distribution (the layout the strong-noise features carry), F_s as a fixed target
    (no gradient), and q̂ reading the strong features as a stop-gradient teacher for q.
    """
    if queries.ndim != 3:
        raise ValueError(f"queries must be [B, r, d], got shape {tuple(queries.shape)}")
    b, _, d = queries.shape
    for x, name in ((weak, "weak"), (strong, "strong")):
        if x.ndim != 4 or x.shape[:2] != (b, d):
            raise ValueError(f"{name} features must be [{b}, {d}, h, w], got shape {tuple(x.shape)}")
    check_same_shape(weak, strong, "weak", "strong")
    f_w, f_s = weak.flatten(2), strong.flatten(2).detach()
    sim = queries @ f_w / d**0.5
    recon = queries.transpose(1, 2) @ sim.softmax(dim=1)
    log_target, log_recon = F.log_softmax(f_s, dim=-1), F.log_softmax(recon, dim=-1)
    l_dist = (log_target.exp() * (log_target - log_recon)).sum(-1).mean()
    optimised = sim.softmax(dim=-1) @ f_s.transpose(1, 2)
    l_sup = F.mse_loss(queries, optimised.detach())
    return l_dist, l_sup


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255, count_ignored: bool = False) -> Tensor:
    """logits [B, C, H, W], target [B, H, W] int64 -> mean CE over non-ignored pixels, or over
    all pixels with `count_ignored` (ignored ones add 0 but count: mmseg before 0.24, hence
    DAFormer's and DIFF's official code).

    0 (not NaN) when every pixel is ignored. Targets outside [0, C) other than ignore_index
    raise inside PyTorch (an IndexError on CPU, a device assert on CUDA).
    """
    if logits.ndim != target.ndim + 1 or logits.shape[:1] + logits.shape[2:] != target.shape:
        shapes = f"{tuple(logits.shape)} and {tuple(target.shape)}"
        raise ValueError(f"logits [B, C, H, W] and target [B, H, W] disagree: {shapes}")
    if target.dtype != torch.long:
        raise TypeError(f"target must be int64 class indices, got {target.dtype}")
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / (target.numel() if count_ignored else (target != ignore_index).sum().clamp(min=1))


def dice_loss(mask_logits: Tensor, targets: Tensor, ignore_index: Optional[int] = None, reduction: str = "mean") -> Tensor:
    """Mask2Former's Dice loss for mask classification: mask logits and {0, 1} (or soft)
    targets [N, ...] for N matched masks, each mask normalised on its own, then averaged:

        L = mean_n [ 1 − (2 Σ σ(x_n)·t_n + 1) / (Σ σ(x_n) + Σ t_n + 1) ]

    With `ignore_index`, pixels whose target equals it are left out of all three sums (as
    `cross_entropy` leaves them out): a binary mask with 255 borders can be passed as it is.
    `reduction="none"`: the N per-mask losses [N] instead of their mean.
    """
    check_same_shape(mask_logits, targets, "mask_logits", "targets")
    if mask_logits.ndim < 2:
        raise ValueError(f"mask_logits must be [N, ...] with pixels after the mask dim, got {tuple(mask_logits.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    p, t = mask_logits.sigmoid().flatten(1), targets.flatten(1)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p * keep, torch.where(keep, t, 0)
    t = t.to(p.dtype)
    per_mask = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return per_mask.mean() if reduction == "mean" else per_mask


def latent_mse(pred: Tensor, target: Tensor) -> Tensor:
    """pred, target [B, 4, h, w] (latents or the schedule's training target) -> mean squared error."""
    check_same_shape(pred, target, "pred", "target")
    return F.mse_loss(pred, target)


def check_finite(loss: Tensor, name: str) -> Tensor:
    """Raise FloatingPointError naming `name` if any element of `loss` is NaN or ±inf; else return
    it. Reads the value (a device sync): call it in the training loop, outside compiled code."""
    if not bool(torch.isfinite(loss).all()):
        raise FloatingPointError(f"{name} is not finite: {loss.detach().flatten()[:8].tolist()}")
    return loss
