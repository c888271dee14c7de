"""Segmentation metrics from a confusion matrix, accumulated on the inputs' device.

    conf = torch.zeros(C, C, dtype=torch.long, device=device)
    for pred, target in batches:
        conf += confusion_matrix(pred, target, C)
    conf = all_reduce_confusion(conf)          # sum over processes under torch.distributed
    print(iou_table(conf, class_names)); miou = mean_iou(conf)
    few_shot_scores(conf, test_labels)        # few-shot mIoU / FB-IoU of episodes' label maps

Conventions (mmseg's `IoUMetric`): pixels whose target is `ignore_index` are dropped before
counting, prediction included; IoU_c = TP / (TP + FP + FN); a class absent from both target
and prediction (union 0) has IoU NaN and is left out of the mean (mmseg's nanmean). FB-IoU
(few-shot segmentation): the mean of background and foreground IoU over a 2×2 matrix
accumulated over the whole evaluation set.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .checks import check_same_shape


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """pred, target [B, H, W] (any matching shape) integer labels -> counts [C, C] int64 on their
    device; rows are target classes, columns predicted classes.

    Predictions must lie in [0, C); targets in [0, C) or equal ignore_index (checked: one sync).
    """
    check_same_shape(pred, target, "pred", "target")
    for x, name in ((pred, "pred"), (target, "target")):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer labels, got {x.dtype}")
    valid = target != ignore_index
    bad_target = valid & ((target < 0) | (target >= num_classes))
    bad_pred = valid & ((pred < 0) | (pred >= num_classes))
    if (bad_target | bad_pred).any():
        raise ValueError(
            f"labels must be in [0, {num_classes}) (targets may also be {ignore_index}); found targets "
            f"{target[bad_target].unique()[:5].tolist()} and predictions {pred[bad_pred].unique()[:5].tolist()}"
        )
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_per_class(conf: Tensor) -> Tensor:
    """conf [C, C] -> IoU [C] float64, NaN for classes absent from target and prediction."""
    _check_confusion(conf)
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    return tp / union  # 0/0 -> NaN by IEEE division


def mean_iou(conf: Tensor) -> Tensor:
    """conf [C, C] -> mIoU, a 0-dim float64 tensor: the mean over classes whose IoU is not NaN."""
    return iou_per_class(conf).nanmean()


def fb_iou(conf: Tensor) -> Tensor:
    """Binary conf [2, 2] (0 = background, 1 = foreground) -> (IoU_bg + IoU_fg) / 2, 0-dim float64."""
    if conf.shape != (2, 2):
        raise ValueError(f"FB-IoU needs a binary confusion matrix [2, 2], got shape {tuple(conf.shape)}")
    return mean_iou(conf)


def few_shot_scores(conf: Tensor, test_labels: Sequence[int]) -> dict[str, float]:
    """Few-shot scores (in %, 2 decimals) of a confusion matrix [L, L] over label maps in which
    each episode's foreground carries its class's label and 0 is background
    (`segmentation.evaluate_episodes`): "mIoU", the foreground IoU of each of `test_labels`
    accumulated over all its episodes, averaged over those classes (HSNet, PFENet); "FB-IoU",
    the mean of background and foreground IoU of the 2×2 matrix that pools every class."""
    _check_confusion(conf)
    bad = [c for c in test_labels if not 0 < c < conf.shape[0]]
    if bad or not len(test_labels):
        raise ValueError(f"test_labels must be non-empty labels in 1..{conf.shape[0] - 1} (0 is background), got {list(test_labels)}")
    binary = torch.stack([conf[0, 0], conf[0, 1:].sum(), conf[1:, 0].sum(), conf[1:, 1:].sum()]).view(2, 2)
    miou = iou_per_class(conf)[list(test_labels)].nanmean()
    return {"mIoU": round(100 * miou.item(), 2), "FB-IoU": round(100 * fb_iou(binary).item(), 2)}


def iou_table(conf: Tensor, class_names: Optional[Sequence[str]] = None, title: Optional[str] = None) -> str:
    """Plain-text table, one row per class: IoU and Acc (recall, TP / target pixels) in percent as
    mmseg prints them, "nan" where undefined, and a last row with the means over defined values,
    labelled with how many classes it averages ("mean of 4 classes"); `title` goes above it."""
    iou = iou_per_class(conf)
    conf = conf.double()
    acc = conf.diagonal() / conf.sum(1)
    names = list(class_names) if class_names is not None else [str(c) for c in range(conf.shape[0])]
    if len(names) != conf.shape[0]:
        raise ValueError(f"got {len(names)} class names for {conf.shape[0]} classes")
    rows = [(n, f"{100 * i:.2f}", f"{100 * a:.2f}") for n, i, a in zip(names, iou.tolist(), acc.tolist())]
    defined = int(iou.isfinite().sum())
    rows.append((f"mean of {defined} classes", f"{100 * iou.nanmean().item():.2f}", f"{100 * acc.nanmean().item():.2f}"))
    header = ("Class", "IoU", "Acc")
    width = max(len(r[0]) for r in [header, *rows])
    lines = [title] if title else []
    lines += [f"{header[0]:<{width}}  {header[1]:>7}  {header[2]:>7}"]
    lines.append("-" * len(lines[-1]))
    lines += [f"{n:<{width}}  {i:>7}  {a:>7}" for n, i, a in rows]
    return "\n".join(lines)


def all_reduce_confusion(conf: Tensor) -> Tensor:
    """Sum of `conf` over all processes when torch.distributed is initialised (a new tensor;
    the input is untouched); `conf` itself otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return conf
    total = conf.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def _check_confusion(conf: Tensor) -> None:
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got shape {tuple(conf.shape)}")
