"""Semantic-segmentation inference and evaluation shared by the recipes (DIFF, QueryDiff, DiGSeg).

Per-class (open-vocabulary) segmentation, one binary mask per class (DiGSeg):

    keep = clip_candidates(clip_vision, images, class_embeds)        # [B, C] bool, A.3
    index, masks = class_mask_pairs(labels, class_ids, absent_prob)  # training: one class per image
    prob = denoise_class_masks(denoiser, vae, schedule, images, class_embeds, ensemble=8, ddim_steps=2)
    labels = candidates_to_labels(prob, candidates, class_ids, background, threshold=0.7)

One run per image instead (DiGSeg §3.4, App. B): the label map as one palette image,

    index = denoise_label_maps(denoiser, vae, schedule, images, embed, palette, ensemble=1, ddim_steps=1)

    logits = slide_logits(model_logits, image, crop=(512, 512), stride=(341, 341), num_classes=19)
    conf, shown = evaluate_semantic(lambda x: model_logits(x).argmax(1), val_set, 19, device)
    print(iou_table(conf, CITYSCAPES_CLASSES))

Few-shot episodes (`unet_seg.data.fewshot`): a predictor of query masks, scored per class

    conf, shown = evaluate_episodes(lambda q, s, sm: masks, task.test[1], task.num_labels, device)
    print(few_shot_scores(conf, task.test_labels))   # {"mIoU": ..., "FB-IoU": ...}

`predict` functions map images [N, 3, h, w] to logits [N, K, h', w'] (any h', w': they are
resized bilinearly) or, for `evaluate_semantic`, to labels [N, h, w] or logits [N, K, h, w].
Datasets yield dict(image [3, H, W], label [H_l, W_l]), as every `unet_seg.data` dataset; the
label may be larger than the image (mmseg's protocol: scored at the annotation's size).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .codecs import check_mask, latent_to_probability, masks_to_label_map, palette_latent_to_labels
from .diffusion import NoiseSchedule, ddim_sample, ddim_timesteps, ensemble_mean
from .metrics import all_reduce_confusion, confusion_matrix
from .models.clip_vision import clip_preprocess
from .train import autocast
from .train import progress, rank_and_world, rank_share

PROGRESS_DELAY = 5.0  # seconds: an evaluation shorter than this shows no progress

Predict = Callable[[Tensor], Tensor]


def slide_logits(
    predict: Predict, image: Tensor, crop: tuple[int, int], stride: tuple[int, int], num_classes: int
) -> Tensor:
    """Overlapping sliding-window logits (mmseg `slide_inference`): image [B, 3, H, W] -> [B, K, H, W].

    Windows of `crop` start every `stride` pixels, the last one flush with the border; all windows
    go through `predict` as one batch; each pixel gets the mean over the windows covering it.
    An image smaller than `crop` along a side is predicted whole along that side.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be [B, 3, H, W], got shape {tuple(image.shape)}")
    if min(*crop, *stride) <= 0 or stride[0] > crop[0] or stride[1] > crop[1]:
        raise ValueError(f"need 0 < stride <= crop on each side (else pixels go uncovered), got crop={crop}, stride={stride}")
    b, _, h, w = image.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    ys = _starts(h, ch, stride[0])
    xs = _starts(w, cw, stride[1])
    windows = torch.cat([image[:, :, y : y + ch, x : x + cw] for y in ys for x in xs])
    logits = predict(windows)
    if logits.ndim != 4 or logits.shape[:2] != (len(windows), num_classes):
        raise ValueError(f"predict must return logits [{len(windows)}, {num_classes}, h, w], got {tuple(logits.shape)}")
    logits = F.interpolate(logits.float(), size=(ch, cw), mode="bilinear", align_corners=False)
    total = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
        total[:, :, y : y + ch, x : x + cw] += logits[i * b : (i + 1) * b]
        count[:, :, y : y + ch, x : x + cw] += 1
    return total / count


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Window starts along one side: every `stride`, the last window ending at `size`."""
    n = max(size - window + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, size - window) for i in range(n)})


@torch.no_grad()
def evaluate_semantic(
    predict: Predict,
    data: Dataset,
    num_classes: int,
    device: torch.device,
    batch_size: int = 1,
    keep: int = 4,
    ignore_index: int = 255,
    desc: str = "evaluating",
) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
    """This rank's share of `data` (items rank, rank + world, ...) -> (confusion [K, K] summed over
    all ranks, up to `keep` (image, prediction, label) triples of this rank, on the CPU, prediction
    and label resized (nearest) to the image for display: labels keep the annotation's size).

    `predict(images [N, 3, H, W]) -> labels [N, H, W] or logits [N, K, h, w]`; logits are resized
    bilinearly to the label's size and arg-maxed, labels resized with nearest. Items of a batch
    must share image and label sizes (batch_size 1 for datasets of mixed sizes). Rank 0 shows
    progress (`desc`: images) once the evaluation takes more than a few seconds.
    """
    shard = rank_share(data)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    shown = []
    bar = progress(total=len(shard), desc=desc, unit="image", delay=PROGRESS_DELAY, leave=False)
    for batch in DataLoader(shard, batch_size=batch_size, collate_fn=_collate):
        image, label = batch[0].to(device), batch[1].to(device)
        pred = predict(image)
        if pred.ndim == 4:
            pred = F.interpolate(pred.float(), size=label.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        else:
            pred = resize_labels(pred, label.shape[-2:])
        conf += confusion_matrix(pred, label, num_classes, ignore_index)
        n = min(keep - len(shown), len(image))
        if n > 0:
            size = image.shape[-2:]
            shown += zip(image[:n].cpu(), resize_labels(pred[:n], size).cpu(), resize_labels(label[:n], size).cpu())
        bar.update(len(image))
    bar.close()
    return all_reduce_confusion(conf), shown


def episode_tensors(batch: dict, device, check: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A collated batch of episodes -> (query [G, 3, H, W], query_mask [G, H, W], supports
    [G, K, 3, H, W], support_masks [G, K, H, W], class_id [G]) on `device`; the masks are checked
    ({0, 1, 255}) first, on the loader's CPU tensors, so that the device need not wait for it
    (`check=False`: episodes of something else than masks, e.g. `fewshot.CachedEpisodes`' posteriors)."""
    if check:
        check_mask(batch["query_mask"], "query_mask")
        check_mask(batch["support_masks"].flatten(0, 1), "support_masks")
    return tuple(batch[k].to(device) for k in ("query", "query_mask", "supports", "support_masks", "class_id"))


@torch.no_grad()
def evaluate_episodes(
    predict: Callable[[Tensor, Tensor, Tensor], Union[Tensor, dict[str, Tensor]]],
    data: Dataset,
    num_labels: int,
    device: torch.device,
    batch_size: int = 8,
    keep: int = 4,
    ignore_index: int = 255,
    desc: str = "evaluating",
):
    """This rank's share of the episodes `data` -> (confusion [L, L] summed over all ranks, up to
    `keep` (query, support 0, its mask, prediction, query mask) tuples of this rank).

    `predict(query, supports, support_masks) -> query masks [G, H, W] in {0, 1}`, or a dict
    {name: masks} to score several predictors in one pass (then the confusion is a dict too and
    the first predictor is shown). Each episode is scored as a label map: prediction and query
    mask times the episode's class label, so that the matrix keeps every class apart for
    `metrics.few_shot_scores`; `ignore_index` pixels of the query mask are not counted. Rank 0
    shows progress (`desc`: episodes) once the evaluation takes more than a few seconds.
    """
    world = rank_and_world()[1]
    if len(data) < world:  # every rank must see an episode to know the predictors' names
        raise ValueError(f"{len(data)} episodes cannot be shared by {world} processes")
    conf: dict[str, Tensor] = {}
    shown = []
    shard = rank_share(data)
    bar = progress(total=len(shard), desc=desc, unit="episode", delay=PROGRESS_DELAY, leave=False)
    for batch in DataLoader(shard, batch_size=batch_size):
        query, query_mask, supports, support_masks, class_id = episode_tensors(batch, device)
        out = predict(query, supports, support_masks)
        masks = out if isinstance(out, dict) else {"": out}
        label = class_id.view(-1, 1, 1)
        target = torch.where(query_mask == ignore_index, ignore_index, query_mask * label)
        for name, m in masks.items():
            if m.shape != query_mask.shape:
                raise ValueError(f"predict must return masks [G, H, W] = {list(query_mask.shape)}, got {list(m.shape)}")
            counts = confusion_matrix(m.long() * label, target, num_labels, ignore_index)
            conf[name] = conf[name] + counts if name in conf else counts
        n = min(keep - len(shown), len(query))
        if n > 0:
            first = next(iter(masks.values()))
            shown += zip(*(t[:n].cpu() for t in (query, supports[:, 0], support_masks[:, 0], first, query_mask)))
        bar.update(len(query))
    bar.close()
    conf = {n: all_reduce_confusion(c) for n, c in conf.items()}
    return (conf[""] if list(conf) == [""] else conf), shown


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Label maps [N, H, W] -> [N, *size], nearest (unchanged when the size already matches)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].to(labels.dtype)


def _collate(items: list) -> tuple[Tensor, Tensor]:
    images, labels = zip(*((item["image"], item["label"]) for item in items))
    return torch.stack(images), torch.stack(labels)


# ---------------------------------------------------------------------------------------------
# Per-class segmentation (DiGSeg)


@torch.no_grad()
def clip_candidates(clip_vision, images: Tensor, class_embeds: Tensor, threshold: float = 0.25,
                    patch_threshold: float = 0.25) -> Tensor:
    """CLIP's candidate classes (DiGSeg A.3): images [B, 3, H, W] in [-1, 1], class_embeds [C, P]
    normalised text embeddings -> bool [B, C]: cos(v, t_c) > threshold (A.3: 0.25), or max over
    patches p of cos(v_p, t_c) > patch_threshold (patch tokens through CLIP's head; A.3 gives no
    value). An image with no candidate keeps its best global class."""
    out = clip_vision(clip_preprocess(images, clip_vision.config.image_size).to(class_embeds.device))
    t = class_embeds.to(out.image_embeds.dtype)
    image_score = F.normalize(out.image_embeds, dim=-1) @ t.T  # [B, C]
    patch_score = (F.normalize(clip_vision.project(out.patch_tokens), dim=-1) @ t.T).amax(1)  # [B, C]
    keep = (image_score > threshold) | (patch_score > patch_threshold)
    best = F.one_hot(image_score.argmax(1), t.shape[0]).bool()
    return torch.where(keep.any(1, keepdim=True), keep, best)


def class_mask_pairs(labels: Tensor, class_ids: Tensor, absent_prob: float) -> tuple[Tensor, Tensor]:
    """labels [B, H, W] (dataset labels, 255 ignore) -> (vocabulary index [B], binary mask [B, H, W]):
    per image a class present in it, or with probability `absent_prob` (always, when none is
    present; never, when every class is) one absent from it, whose mask is empty. Draws from the
    global RNG."""
    picks = []
    for lab in labels:
        present = torch.isin(class_ids, lab.unique().to(class_ids.device))
        take_present = present.any() and (torch.rand(()) >= absent_prob or present.all())
        pool = present if take_present else ~present
        choice = pool.nonzero()[:, 0]
        picks.append(choice[torch.randint(len(choice), ())])
    index = torch.stack(picks).to(labels.device)
    masks = (labels == class_ids.to(labels.device)[index].view(-1, 1, 1)).long()
    return index, masks


def candidates_to_labels(prob: Tensor, candidates: Tensor, class_ids: Tensor, background: int,
                         threshold: Optional[float] = None) -> Tensor:
    """prob [B, K, H, W] of the vocabulary classes `candidates` [K] -> dataset labels [B, H, W]:
    pixel-wise argmax over the candidates, and with a `threshold` τ the `background` label where
    the best probability is below τ (DiGSeg A.3). Without one, plain argmax: the reading for
    label sets without a background class (ADE20K-150)."""
    index = prob.argmax(1) if threshold is None else masks_to_label_map(prob, prob.shape[1], threshold)
    table = torch.cat([class_ids.to(prob.device)[candidates.to(prob.device)], torch.tensor([background], device=prob.device)])
    return table[index]


@torch.no_grad()
def denoise_latents(denoiser, vae, schedule: NoiseSchedule, images: Tensor, class_embeds: Tensor, ensemble: int,
                    ddim_steps: int, noise: Optional[Tensor] = None) -> Tensor:
    """images [B, 3, H, W], class_embeds [K, P] (the same for every image) -> denoised latents
    [B·K, 4, h, w], image-major (DiGSeg §3.7, A.3): for each (image, embedding), `ensemble`
    DDIM-trailing runs of `ddim_steps` steps from N(0, I) (`noise` [E, B·K, 4, h, w]; default
    drawn from the global RNG), averaged in latent space. `denoiser(y_t, z_x, t, class_embeds)`
    predicts in the schedule's parameterisation. The image is encoded once and its latent shared
    by its K runs: all K·E runs go through each denoiser call together (bf16 autocast on a GPU)."""
    b, k = images.shape[0], class_embeds.shape[0]
    z_x = vae.encode(images).repeat_interleave(k, dim=0)  # [B·K, 4, h, w], image-major
    cond = class_embeds.repeat(b, 1)  # [B·K, P]
    timesteps = ddim_timesteps(ddim_steps, schedule.num_train_timesteps, "trailing")

    def run(noise: Tensor) -> Tensor:  # [r·B·K, 4, h, w], r ensemble members stacked run-major
        r = noise.shape[0] // z_x.shape[0]
        zx, c = z_x.repeat(r, 1, 1, 1), cond.repeat(r, 1)
        with autocast(images.device):
            return ddim_sample(lambda x, t: denoiser(x, zx, t, c).float(), noise, timesteps, schedule)

    if noise is None:
        noise = torch.randn(ensemble, *z_x.shape, device=images.device)
    elif noise.shape != (ensemble, *z_x.shape):
        raise ValueError(f"noise must be [E, B·K, 4, h, w] = {[ensemble, *z_x.shape]}, got {list(noise.shape)}")
    return ensemble_mean(run, noise).to(images.dtype)


@torch.no_grad()
def denoise_class_masks(denoiser, vae, schedule: NoiseSchedule, images: Tensor, class_embeds: Tensor, ensemble: int,
                        ddim_steps: int, noise: Optional[Tensor] = None, decode_rows: int = 8) -> Tensor:
    """images [B, 3, H, W], class_embeds [K, P] -> class probabilities [B, K, H, W]: one
    `denoise_latents` run per (image, class), each decoded as a white-on-black mask (A.3), at most
    `decode_rows` latents per VAE call (an fp32 decode at 512² holds ≈ 0.9 GB per latent: all 150
    of ADE20K's classes in one call run out of an 80 GB GPU)."""
    if decode_rows < 1:
        raise ValueError(f"decode_rows must be a positive number of latents per VAE decode, got {decode_rows}")
    z = denoise_latents(denoiser, vae, schedule, images, class_embeds, ensemble, ddim_steps, noise)
    prob = torch.cat([latent_to_probability(vae, part) for part in z.split(decode_rows)])
    return prob.unflatten(0, (images.shape[0], class_embeds.shape[0]))


@torch.no_grad()
def denoise_label_maps(denoiser, vae, schedule: NoiseSchedule, images: Tensor, embed: Tensor, palette: Tensor,
                       ensemble: int, ddim_steps: int, noise: Optional[Tensor] = None) -> Tensor:
    """images [B, 3, H, W], one conditioning embedding [1, P] -> palette indices [B, H, W] int64
    in 0..C−1: one `denoise_latents` run per image, decoded by the nearest colour of `palette`
    [C, 3] (DiGSeg §3.4, App. B: the label map as one image; `codecs.labels_to_palette_latent`
    encodes the training targets). Pixels nearest the ignore colour get the last index, C−1."""
    z = denoise_latents(denoiser, vae, schedule, images, embed, ensemble, ddim_steps, noise)
    return palette_latent_to_labels(vae, z, palette, ignore_index=palette.shape[0] - 1)
