"""DIFF: diffusion feature fusion with implicit posterior knowledge learning (IPKL), for domain-
generalised segmentation: train on GTA5 (or Cityscapes), test on unseen Cityscapes, BDD100K,
Mapillary (or ACDC, Dark Zurich). `--demo`: a synthetic clean style -> an unseen hazy style.

Ji et al., "Diffusion Features to Bridge Domain Gap for Semantic Segmentation" (paper text:
../shared/design/papers/diff-ipkl.txt); defaults follow the official code Yux1angJi/DIFF
(diff_config.yaml, diffusion.py generalized_steps, encoder_decoder.py, experiments.py id 50).

    python recipes/diff_gta2cs.py --demo                                # CPU, minutes, no download
    python recipes/diff_gta2cs.py --model stabilityai/stable-diffusion-2-1 --data-root /data \
        --source gta5 --targets cityscapes bdd100k mapillary acdc darkzurich    # the official run: 1 GPU, batch 1

Method (frozen SD 2.1; trainable: the fusion block and the decode head, shared by both branches):

    z_0 ~ E(image); 37-step stochastic DDIM inversion z_0 -> z_160, CFG 5, η = 1 for 10 < t < 250
    conditional path: at every step each prompt C_i (C_0 = "", M_0 = 1; C_i a prompted class
        present in the label, M_i its mask) takes its own step; z = Σ M_i z^i / Σ M_i          eq. 2
    F = ⊕_{t, l} [ResNet residual branch of the "" row, Σ_rows transformer-block output]     eq. 1
        at the 9 saved steps t = 91 … 3, up levels 1-3 (strides 32, 16, 8)
    L = CE(D(F_conv(F_cond)), y) + CE(D(F_conv(F_uncond)), y) + ‖D(F_cond) − D(F_uncond)‖²   (official)
    inference: D(F_conv(F_uncond)) only, whole image

| setting | paper | official code | here (default) | why / flag |
|---|---|---|---|---|
| model | SD 2.1, frozen | stabilityai 2-1 (768, v-pred), fp16 | same, bf16 autocast on GPU | |
| trained precision | – | fusion block and head in fp32 (no AMP in the mmseg config) | same | `--amp`: bf16 autocast (faster) |
| trajectory | "multi-step diffusion trajectory", inversion | 37-step stochastic DDIM inversion (t ≤ 160), η = 1 for 10 < t < 250, CFG 5, U-Net evaluated at 0 … 139, features at steps 33 … 3 (t = 91, 52, 30, 22, 18, 14, 11, 7, 3) | same; the 3 steps after the last saved one are skipped (they cannot change the features) | `--features batched`: the 9 noisy latents forward-sampled in ONE U-Net call, eq. 2 on features (faster approximation, docs/recipes/diff.md) |
| v-prediction | not discussed | SD 2.1's v output used as ε | same | `--prediction-type model` converts v to ε |
| eq. 2 fusion | masks fuse the predicted latents Φ(I, C_i) | per step, next latents of each prompt path | same (`inversion_trajectory_features`) | |
| prompts | all categories | "" + 5 classes (sidewalk, wall, rider, truck, train), template below | same | |
| unconditional branch | Φ(I, "") | CFG of "" against "" (2 identical rows) | 1 row (identical result), summed features counted twice | |
| ResNet feature | F_inter of the decoder | residual branch after conv2, "" row | `up.i.res.j.branch` | |
| attention feature | cross-attention maps | transformer-block output, summed over all rows | `up.i.attn.j`, summed | |
| branches | two | independent VAE samples and noise | same | |
| fusion, head | F_conv, DAFormer head | GN bottleneck 2048/1024/512 + finecoder 256; sep-ASPP head, dilations 1/6/12/18 | same | crops other than 512² scale the dilations (`scaled_dilations`) |
| losses | eq. 5: CE(cond) + L2 | CE(cond) + CE(uncond) + L2 on stride-4 logits, nothing detached; CE averaged over all pixels (mmseg 0.16) | same | `--loss paper`: eq. 5, teacher detached |
| KL variant | Table IV 57.81, no equation | `kl_loss` commented out: min(0.1 · KL, 0.5) (KL cut at 5), T 1, batchmean | same | `--consistency kl` |
| data | "as DAFormer" | GTA5 resized to 1280 × 720 (cv2 bilinear, labels nearest), 512² crop (cat_max_ratio 0.75), flip, PhotoMetricDistortion, rare-class sampling T 0.01 | same (`unet_seg.data.transforms`); labels sampled at pixel centres (cv2: top-left, ≤ ½ px off the image) | demo: its synthetic scenes as they are |
| optimiser | as DAFormer | AdamW 6e-5, head × 10, wd 0.01, poly + 1500 warm-up, 40k iterations, grad-norm clip 5 | same | |
| batch | – | 1 GPU, batch 1 | same | torchrun: batch N, docs/recipes/diff.md |
| evaluation | mIoU, 19 classes | whole image, Cityscapes 1024 × 512, unseeded noise | same, noise seeded (`--seed`): one draw, the same for every image | reproducible predictions |

Demo: no pretrained weights here, so the tiny U-Net is pre-trained for 100 steps as a text-conditioned denoiser
on *unlabelled* synthetic scenes of random looks (captions: the forms present), with the weight-free `BlockCodec`
as VAE and a 4-step trajectory; then DIFF trains on the labelled clean style (five forms) and is tested on the hazy
style, beside the same model without IPKL and an all-background floor: the pipeline, not the paper's gain (docs/recipes/diff.md).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

from unet_seg.cli import parse_recipe_args, recipe_parser, run

TRAJECTORY = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 26, 30, 34, 40, 45,
              52, 60, 69, 80, 91, 105, 121, 139, 160)  # official scheduler_timesteps (ascending)
TIMESTEPS = (91, 52, 30, 22, 18, 14, 11, 7, 3)  # U-Net times of the official save_timestep steps 33 ... 3
ETA_RANGE, GUIDANCE = (10, 250), 5.0  # official s_tmin, s_tmax (η = 1 strictly inside), guidance_scale
LEVELS = (3, 2, 1)  # up levels tapped, fine to coarse: strides 8, 16, 32 of the image
PROMPT_TEMPLATE = "A high quality photo; europe city; {}"
PROMPTS = {  # official label_map: the five prompted Cityscapes train ids
    1: "sidewalk, Paths for pedestrian use",
    3: "wall, Outer walls of buildings or structures",
    12: "rider, People riding bicycles, motorcycles",
    14: "truck, Larger vehicles used for cargo transport",
    16: "train, Vehicles on railway tracks",
}
DEMO = dict(size=64, steps=300, batch_size=8, lr=1e-3, warmup=30, eval_items=96, pretrain_steps=100, timesteps=(91, 30, 7), trajectory=(7, 30, 91, 120))
REAL = dict(size=512, steps=40000, batch_size=1, lr=6e-5, warmup=1500, eval_items=0, pretrain_steps=0, timesteps=TIMESTEPS, trajectory=TRAJECTORY)


def parse_args(argv=None) -> argparse.Namespace:
    p = recipe_parser(
        "DIFF + IPKL domain-generalised segmentation: train on a source domain, report mIoU on unseen target domains. "
        "--demo runs on CPU with tiny models (a pre-trained SD, else random) and synthetic styles (no download); otherwise give --data-root.",
        DEMO, REAL, out="runs/diff", eval_items="test images per target domain",
    )  # fmt: skip
    p.add_argument("--data-root", help="folder holding gta5/, cityscapes/, bdd100k/, mapillary/, acdc/, darkzurich/")
    p.add_argument("--source", default="gta5", choices=("gta5", "cityscapes"), help="training domain")
    p.add_argument("--targets", nargs="+", default=["cityscapes", "bdd100k", "mapillary"], help="unseen test domains (val splits)")
    p.add_argument("--features", default="trajectory", choices=("trajectory", "batched"), help="official inversion trajectory, or the one-call forward-noised approximation (faster)")
    p.add_argument("--prediction-type", default="as-eps", choices=("as-eps", "model"), help="U-Net output used as ε (official, also for SD 2.1's v) or read in the checkpoint's parameterisation (--features trajectory only)")
    p.add_argument("--loss", default="official", choices=("official", "paper"), help="official: CE on both branches, nothing detached; paper: eq. 5, CE(cond), teacher detached")
    p.add_argument("--consistency", default="l2", choices=("l2", "kl"), help="IPKL consistency loss (paper Table IV)")
    p.add_argument("--no-ipkl", action="store_true", help="train the unconditional branch alone with CE (Table IV, 'DIFF' row)")
    p.add_argument("--no-baseline", action="store_true", help="demo: skip training the no-IPKL baseline")
    p.add_argument("--no-rcs", action="store_true", help="uniform image sampling instead of rare-class sampling")
    p.add_argument("--amp", action="store_true", help="bf16 autocast over the trained fusion block and head on a GPU (faster; the release trains them in fp32)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, help="replay each training step (trajectory, head, "
                   "optimiser) as one CUDA graph, one graph per prompt-row count, and each evaluation's trajectory and head, one graph "
                   "per image size: the host no longer paces the GPU; default: on where the run has one GPU and --features trajectory")
    p.add_argument("--small-head", action="store_true", help="the demo's fusion and head widths (32/64/128, 32, 32) instead of "
                   "the official 512/1024/2048, 256, 256 (106M parameters): to rehearse a real run on a CPU")
    p.add_argument("--timesteps", type=int, nargs="+", help=f"U-Net times of the saved steps (default {REAL['timesteps']}, demo {DEMO['timesteps']})")
    p.add_argument("--trajectory", type=int, nargs="+", help="inversion targets (default the official 37; demo 7 30 91 120; --features trajectory only)")
    p.add_argument("--warmup", type=int, help=f"linear warm-up steps ({REAL['warmup']}, demo {DEMO['warmup']})")
    p.add_argument("--pretrain-steps", type=int, help="with --demo --random-demo-model: denoising pre-training steps of the tiny random U-Net (100)")
    given = p.parse_known_args(argv)[0]  # before the presets fill --trajectory in
    args = parse_recipe_args(p, argv, DEMO, REAL, data=["--data-root"], dataset="GTA5 / Cityscapes")
    if args.predict:
        return args
    if args.features == "batched" and (given.trajectory is not None or args.prediction_type != "as-eps" or args.cuda_graph):
        p.error("--trajectory, --prediction-type and --cuda-graph apply to --features trajectory only (batched forward-noises the latents, no inversion)")
    starts = [0, *sorted(args.trajectory)[:-1]]
    if args.features == "trajectory" and not set(args.timesteps) <= set(starts):
        p.error(f"--timesteps must be U-Net times of the trajectory ({starts}), got {args.timesteps}")
    return args


if __name__ == "__main__":
    parse_args()  # usage errors here, before the seconds that importing torch takes
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unet_seg import load_sd
from unet_seg.data import synthetic
from unet_seg.demo import FORM_CLASSES, BlockCodec, FormScenes, caption_forms, demo_sd, pretrain_unless_resuming
from unet_seg.diffusion import NoiseSchedule
from unet_seg.heads import DAFORMER_DILATIONS, DAFormerHead, DiffusionFeatureFusion, scaled_dilations
from unet_seg.losses import consistency_kl, consistency_l2, cross_entropy
from unet_seg.metrics import iou_table, mean_iou
from unet_seg.predict import Predictor, default_device, load_checkpoint_for_export, load_tensors, logits_predictor, predict_files, read_export, save_export, trained_tensors
from unet_seg.models import UNet
from unet_seg.segmentation import evaluate_semantic
from unet_seg.taps import fuse_rows, inversion_trajectory_features, timestep_features
from unet_seg.train import (
    CudaGraphCall, CudaGraphStep, autocast, backward_and_step, check_finite_everywhere, finish_run, head, maybe_compile, print0, progress,
    rank_and_world, resumable_loader, resume_latest, same_init_on_every_rank, sanity_check, save_checkpoint, should_checkpoint, start_run,
    training_batches, use_cuda_graph, wrap_for_training,
)  # fmt: skip
from unet_seg.viz import image_to_uint8, overlay, save_grid


# ---------------------------------------------------------------------------------------------
# DIFF features


def level_names(unet) -> list[tuple[list[str], list[str]]]:
    """Per tapped up level: (ResNet residual branches, read from the "" row; transformer-block
    outputs, summed over the prompt rows), as the official `idxs_resnet`, `idxs_ca`."""
    return [
        ([f"up.{i}.res.{j}.branch" for j in range(len(unet.up_blocks[i].resnets))],
         [f"up.{i}.attn.{j}" for j in range(len(unet.up_blocks[i].attentions))])
        for i in LEVELS
    ]  # fmt: skip


def prompt_rows(labels, prompt_ids: list[int], size, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per trajectory a label map [H, W] (conditional branch) or None (unconditional) -> its prompt
    rows on `device`: row_image [R], row_prompt [R] (0 = "", k = prompt of class prompt_ids[k − 1]),
    row_mask [R, h, w] (1 for "", a present class's label mask, nearest-resized to the latent size).
    R depends on the classes present, so the rows are found on the host, from the CPU labels."""
    labels = [None if y is None else y.cpu() for y in labels]
    rows = [(n, k) for n, y in enumerate(labels) for k in [0, *([] if y is None else [k for k, c in enumerate(prompt_ids, 1) if bool((y == c).any())])]]
    masks = [torch.ones(size, device="cpu") if k == 0 else F.interpolate((labels[n] == prompt_ids[k - 1])[None, None].float(), size, mode="nearest")[0, 0] for n, k in rows]
    return *torch.tensor(rows, device=device).T, torch.stack(masks).to(device)


def branch_rows(frozen: Frozen, label, ipkl: bool, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `prompt_rows` of a training step's trajectories, label [B, H, W] (CPU): each image's
    conditional branch, then its unconditional one (IPKL); or the unconditional ones alone."""
    b, latent = len(label), (label.shape[-2] // 8, label.shape[-1] // 8)  # the VAE's stride
    return prompt_rows([*label, *[None] * b] if ipkl else [None] * b, frozen.prompt_ids, latent, device)


def inversion_schedule(trajectory, saved) -> tuple[list[tuple[int, int]], list[float], list[int]]:
    """The official `generalized_steps` inversion: U-Net at t_i = [0, *S][i] moving to S[i] (S the
    ascending targets), η = 1 where 10 < t_i < 250; -> (steps, etas, indices of the saved times)."""
    targets = sorted(trajectory)
    steps = list(zip([0, *targets[:-1]], targets))
    etas = [1.0 if ETA_RANGE[0] < t < ETA_RANGE[1] else 0.0 for t, _ in steps]
    return steps, etas, [[t for t, _ in steps].index(t) for t in saved]


def diffusion_levels(frozen: Frozen, z0, rows, args, generator=None) -> list[torch.Tensor]:
    """z0 [N, 4, h, w] (one latent per branch of each image), the N trajectories' `prompt_rows` ->
    per tapped level [N, C_level, h_l, w_l]: block-major, time-minor (official)."""
    levels = level_names(frozen.unet)
    plain, summed = [n for p, _ in levels for n in p], [n for _, s in levels for n in s]
    if args.features == "trajectory":
        steps, etas, save = inversion_schedule(args.trajectory, args.timesteps)
        feats = inversion_trajectory_features(
            frozen.unet, z0, rows[0], frozen.contexts[rows[1]], rows[2], plain, summed, steps=steps, etas=etas, save_steps=save,
            schedule=frozen.schedule, guidance_scale=GUIDANCE, generator=generator,
        )  # fmt: skip
    else:  # every prompt row forward-noised to the K times in one call, its features fused by the masks
        noise = torch.randn(z0.shape[0], len(args.timesteps), *z0.shape[1:], generator=generator, device=z0.device)
        feats = timestep_features(
            frozen.unet, z0[rows[0]], args.timesteps, frozen.contexts[rows[1]], plain + summed,
            schedule=frozen.schedule, noise=noise[rows[0]].to(z0.dtype),
        )  # fmt: skip
        feats = {n: fuse_rows(f, rows[0], rows[2], len(z0)) for n, f in feats.items()}
    return [torch.cat([feats[n].flatten(1, 2) for n in p + s], 1).float() for p, s in levels]


class Segmenter(nn.Module):
    """The trainable part shared by both branches: D(F_conv(levels)) -> logits at stride 4."""

    def __init__(self, level_channels, num_classes: int, dims, fine_dim: int, embed_dim: int, groups: int, dilations=DAFORMER_DILATIONS):
        super().__init__()
        self.config = dict(level_channels=list(level_channels), num_classes=num_classes, dims=list(dims), fine_dim=fine_dim, embed_dim=embed_dim, groups=groups, dilations=list(dilations))
        self.fusion = DiffusionFeatureFusion(level_channels, dims, fine_dim, bottleneck_groups=groups // 2, groups=groups)
        self.head = DAFormerHead(self.fusion.out_channels, num_classes, embed_dim, dilations)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.fusion(levels))


# ---------------------------------------------------------------------------------------------
# Training and inference


def train_step(model, frozen: Frozen, opt, image, label, rows, ipkl: bool, args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step: official (CE on both branches + consistency, nothing detached), eq. 5
    (`--loss paper`), or CE on the unconditional branch alone (without IPKL). image [B, 3, H, W],
    label [B, H, W], rows: `prompt_rows` of [*label, None × B] (IPKL) or [None × B]. No host sync
    (a CUDA graph can hold it): a non-finite loss skips the update on the device. -> (loss, {term:
    value}), for the caller to check (`check_finite_everywhere`) and log."""
    b = image.shape[0]
    with torch.no_grad(), autocast(image.device):
        z0 = frozen.vae.encode(torch.cat([image] * (2 if ipkl else 1)), sample=True)  # own posterior sample per branch
        levels = diffusion_levels(frozen, z0, rows, args)
    up = lambda logits: F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
    ce = partial(cross_entropy, count_ignored=True)  # mmseg 0.16: mean over all pixels
    with autocast(image.device, enabled=None if args.amp else False):  # fp32 as released; one head call per branch (BN statistics per branch)
        logits_u = model([f[-b:] for f in levels]).float()
        logits_c = model([f[:b] for f in levels]).float() if ipkl else None
    losses = {"CE uncond": ce(up(logits_u), label)}
    if ipkl:
        official = args.loss == "official"
        losses["CE cond"] = ce(up(logits_c), label)  # eq. 3
        if not official:
            del losses["CE uncond"]
        if args.consistency == "l2":  # eq. 4, on the stride-4 logits
            losses["consistency"] = consistency_l2(logits_u, logits_c, detach_teacher=not official)
        else:
            # official kl_loss: min(0.1 · KL, 0.5), i.e. the KL cut at 5
            losses["consistency"] = consistency_kl(logits_u, logits_c, not official, reduction="batchmean", weight=0.1, max_value=0.5)
    loss = backward_and_step(opt, [p for g in opt.param_groups for p in g["params"]], sum(losses.values()), max_norm=5.0)
    return loss.detach(), {k: v.detach() for k, v in losses.items()}


def predict_logits(segmenter, frozen: Frozen, image, args, graphs: Optional[CudaGraphCall] = None) -> torch.Tensor:
    """Inference, the unconditional branch only: image [B, 3, H, W] -> logits [B, K, H/4, W/4].
    The VAE sample and the trajectory noise are drawn from `args.seed` for every call, so predictions
    are reproducible; `graphs` (a `CudaGraphCall` of `unconditional_logits`) replays one graph per image size."""
    rows = prompt_rows([None] * len(image), [], (image.shape[-2] // 8, image.shape[-1] // 8), image.device)  # the VAE's stride
    with torch.random.fork_rng(devices=[image.device] if image.is_cuda else []):
        torch.manual_seed(args.seed)
        if graphs is not None:
            return graphs(image, *rows).clone()
        return unconditional_logits(segmenter, frozen, args, image, *rows)


@torch.no_grad()
def unconditional_logits(segmenter, frozen: Frozen, args, image, *rows) -> torch.Tensor:
    """`predict_logits` without its seeding: draws from the default generators, no host sync."""
    with autocast(image.device):
        z0 = frozen.vae.encode(image, sample=True)
        levels = diffusion_levels(frozen, z0, rows, args)
    with autocast(image.device, enabled=None if args.amp else False):
        return segmenter(levels).float()


def poly_with_warmup(total: int, warmup: int):
    """DAFormer's `poly10warm`: lr · (1 − s/total), ramped linearly from 1e-6 · lr over `warmup` steps."""
    return lambda step: (1.0 if step >= warmup else 1 - (1 - step / warmup) * (1 - 1e-6)) * max(0.0, 1 - step / total)


@dataclass
class Frozen:
    """The frozen diffusion side shared by both branches and by every model trained in one run."""

    unet: UNet
    vae: nn.Module
    contexts: torch.Tensor  # [1 + P, 77, D]: the empty prompt, then one prompt per prompted class
    prompt_ids: list[int]
    schedule: NoiseSchedule  # how the trajectory reads the U-Net's outputs (`output_schedule`), on the U-Net's device
    level_channels: list[int]


def output_schedule(schedule: NoiseSchedule, prediction_type: str) -> NoiseSchedule:
    """The checkpoint's schedule as the trajectory reads the U-Net's outputs: as ε whatever the
    checkpoint predicts (official, `as-eps`), or in its own parameterisation (`model`)."""
    return NoiseSchedule(schedule.alphas_cumprod, "epsilon") if prediction_type == "as-eps" else schedule


def fit(args, ipkl: bool, out: Path, frozen: Frozen, train_data, targets: dict, num_classes: int, device, trainings: int = 1):
    """Train a fresh fusion block + head on the source domain (IPKL, or CE alone without it),
    resuming from `out` with --resume, after a sanity check (real runs: 2 steps, a checkpoint,
    one image of every target); returns the trained `Segmenter`."""
    out.mkdir(parents=True, exist_ok=True)
    dims, fine_dim, embed_dim, groups = ((32, 64, 128), 32, 32, 8) if args.demo or args.small_head else ((512, 1024, 2048), 256, 256, 32)
    with same_init_on_every_rank(args.seed):  # then each rank its own posterior samples and trajectory noise
        segmenter = Segmenter(frozen.level_channels, num_classes, dims, fine_dim, embed_dim, groups, scaled_dilations(args.size // 4)).to(device).train()
    if device.type == "cuda":
        segmenter.to(memory_format=torch.channels_last)
        if rank_and_world()[1] > 1:
            segmenter = nn.SyncBatchNorm.convert_sync_batchnorm(segmenter)
    models = {"segmenter": segmenter} | ({"unet": frozen.unet} if args.demo and args.random_demo_model else {})  # pre-trained here
    rate = (lambda lr: torch.tensor(lr, device=device)) if args.cuda_graph else float  # a graph reads the schedule's lr from the GPU
    groups = [{"params": segmenter.fusion.parameters(), "lr": rate(args.lr)}, {"params": segmenter.head.parameters(), "lr": rate(10 * args.lr)}]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=0.01, fused=True, capturable=args.cuda_graph)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_with_warmup(args.steps, args.warmup))
    step = resume_latest(out, models, optimizer=opt, scheduler=sched, steps=args.steps) if args.resume else 0
    if args.export:
        load_checkpoint_for_export(out, args.export, models)
        return segmenter.eval()
    model = wrap_for_training(segmenter, compile=args.compile)
    loader = resumable_loader(train_data, args.batch_size, args.seed, num_workers=args.workers)

    train = lambda image, label, *rows: train_step(model, frozen, opt, image, label, rows, ipkl, args)  # noqa: E731

    def one_step(batch) -> dict:
        image, label = batch["image"], batch["label"]
        loss, losses = train(image.to(device), label.to(device), *branch_rows(frozen, label, ipkl, device))
        check_finite_everywhere(loss, "DIFF loss")  # after the step, which a non-finite loss skipped
        sched.step()
        return {k: v.item() for k, v in losses.items()}

    predict = lambda x: predict_logits(segmenter, frozen, x, args)  # noqa: E731
    sanity_check(args, out=out, step=step, loader=loader, train=one_step, models=models, optimizer=opt, scheduler=sched,
                 evaluate=lambda data: evaluate_semantic(predict, data, num_classes, device), targets=targets, trainings=trainings)  # fmt: skip
    if args.cuda_graph:  # captured after the sanity check, which reloads the optimiser state a graph would hold; one graph per row count
        train = CudaGraphStep(train, [model], opt)
    bar = progress(total=args.steps, initial=step, desc="DIFF + IPKL" if ipkl else "DIFF (no IPKL)")
    for step, epoch, batch in training_batches(loader, step, args.steps):
        losses = one_step(batch)
        bar.update()
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        if step % max(1, args.steps // 10) == 0:  # also for logs, where the bar is silent
            print0(f"step {step}/{args.steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        if should_checkpoint(step, args.save_every, args.steps):
            save_checkpoint(out, step, models, optimizer=opt, scheduler=sched, epoch=epoch, extra={"args": str(vars(args))}, keep_last=2, final=args.demo and step == args.steps)
    bar.close()
    if args.cuda_graph:
        train.close()  # before the process group goes: a live graph holding NCCL calls hangs destroy_process_group
    return segmenter.eval()


def evaluate(segmenter, frozen: Frozen, targets: dict, num_classes: int, class_names, device, args):
    """mIoU of the unconditional branch on every domain -> ({domain: mIoU %}, rows of overlays);
    with --cuda-graph each image size's trajectory replays as one CUDA graph."""
    graphs = CudaGraphCall(partial(unconditional_logits, segmenter, frozen, args)) if args.cuda_graph else None
    predict = lambda x: predict_logits(segmenter, frozen, x, args, graphs)  # noqa: E731
    metrics, shown = {}, {}
    for name, data in targets.items():
        conf, shown[name] = evaluate_semantic(predict, data, num_classes, device, batch_size=8 if args.demo else 1)
        metrics[name] = round(100 * mean_iou(conf).item(), 2)
        print0("\n" + iou_table(conf, class_names, title=f"{name}: IoU per class (mIoU {metrics[name]:.2f}: their mean)"))
    if graphs is not None:
        graphs.close()
    return metrics, shown


def export(segmenter, frozen: Frozen, sd, args, class_names, palette) -> None:
    """RUN/model: fusion + head and the empty prompt's context; the frozen SD's id (demo: sd/, the tiny pre-trained U-Net)."""
    resize = {"square": args.size} if args.demo else {"scale": (1024, 512)}  # as the Cityscapes test set
    config = dict(recipe="diff", model="sd" if args.demo else args.model, demo=args.demo, class_names=list(class_names), resize=resize,
                  palette=None if palette is None else palette.tolist(), segmenter=segmenter.config)  # fmt: skip
    save_export(args.out / "model", config, trained_tensors(segmenter) | {"empty_prompt": frozen.contexts[:1]}, sd=sd if args.demo else None, args=args)


def load_trained(run, device=None) -> Predictor:
    """A trained run (or its model/ folder) -> predictor(image) -> class ids [H, W] at the image's size."""
    device, (folder, config, tensors) = default_device(device), read_export(run, "diff")
    sd = load_sd(config["model"], components=["unet"] if config["demo"] else ["unet", "vae"], device=device)
    vae = BlockCodec() if config["demo"] else sd.vae.eval()
    args = argparse.Namespace(**config["args"])
    schedule = output_schedule(sd.schedule, args.prediction_type).to(device)
    frozen = Frozen(sd.unet.eval(), vae, tensors.pop("empty_prompt").to(device), [], schedule, config["segmenter"]["level_channels"])
    segmenter = load_tensors(Segmenter(**config["segmenter"]), tensors, str(folder)).to(device).eval()
    predict = lambda x: predict_logits(segmenter, frozen, x, args)  # noqa: E731
    parts = {"segmenter": segmenter, "unet": frozen.unet, "vae": vae, "empty_prompt": frozen.contexts, "schedule": frozen.schedule}
    return logits_predictor(predict, config, parts, device, untinted=0 if config["demo"] else None)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.predict:
        return predict_files(load_trained(args.run), args.predict, args.out)
    job = start_run(
        args,
        demo=(f"tiny SD-structured U-Net pre-trained here for {args.pretrain_steps} steps on captioned synthetic scenes, " if args.random_demo_model
              else "tiny SD pre-trained on captioned synthetic scenes, ") +
        "a frozen 8x8 block codec in place of SD's VAE, synthetic clean -> hazy styles segmented by form",
        real="--model <SD 2.x> --data-root <GTA5, Cityscapes, ...>",
    )
    device = job.device
    # the default: one GPU and the official trajectory (tested equal to the eager step there)
    args.cuda_graph = use_cuda_graph(args.cuda_graph, device, "diff_gta2cs.py", default=args.features == "trajectory" and rank_and_world()[1] == 1)

    # ---- data: a labelled source domain; unseen target domains for evaluation only
    if args.demo:
        num_classes, class_names, palette = len(FORM_CLASSES), FORM_CLASSES, None
        train_data = FormScenes(args.seed, 100_000, args.size, synthetic.CLEAN_STYLE)
        targets = {f"{n} ({role} style)": FormScenes(args.seed + 1, args.eval_items, args.size, style)
                   for n, role, style in (("clean", "source", synthetic.CLEAN_STYLE), ("hazy", "unseen", synthetic.HAZY_STYLE))}  # fmt: skip
        prompt_ids = list(range(1, num_classes))
        prompts = list(class_names[1:])
    else:
        from unet_seg.data.driving import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, LAYOUTS, DrivingScenes
        from unet_seg.data.transforms import (
            Compose, PhotoMetricDistortion, RandomCrop, RandomFlip, RareClassSampling, Resize, ResizeImage,
        )  # fmt: skip

        root = Path(args.data_root)
        num_classes, class_names = len(CITYSCAPES_CLASSES), CITYSCAPES_CLASSES
        palette = np.array(CITYSCAPES_PALETTE, np.uint8)
        crop = Compose((Resize(LAYOUTS[args.source].scale), RandomCrop((args.size,) * 2, 0.75), RandomFlip(), PhotoMetricDistortion()))
        train_data = DrivingScenes(args.source, root / args.source, "train", crop, seed=args.seed)
        if not args.no_rcs:  # DAFormer's rare-class sampling (T = 0.01), class statistics cached beside the data
            train_data = RareClassSampling(train_data, train_data.class_counts(), temperature=0.01, seed=args.seed)
        targets = {n: DrivingScenes(n, root / n, "val", ResizeImage(LAYOUTS[n].scale)) for n in args.targets}
        if args.eval_items:
            targets = {n: head(d, args.eval_items) for n, d in targets.items()}
        prompt_ids = list(PROMPTS)
        prompts = [PROMPT_TEMPLATE.format(PROMPTS[c]) for c in prompt_ids]

    # ---- the frozen diffusion side (demo: pre-trained here), prompt contexts computed once
    with same_init_on_every_rank(args.seed):
        sd = demo_sd(args.random_demo_model) if args.demo else load_sd(args.model, device=device)
    unet, vae = sd.unet.to(device), sd.vae.to(device)
    sd.text_encoder.to(device).eval().requires_grad_(False)
    captions = lambda labels: caption_forms(labels, sd.text_encoder, sd.tokenizer)  # noqa: E731
    pretrain_unless_resuming(sd, out=args.out, resume=bool(args.resume or args.export), steps=args.pretrain_steps if args.demo and args.random_demo_model else 0,
                             size=args.size, seed=args.seed, device=device, condition=captions, batch_size=8)  # fmt: skip
    vae.eval().requires_grad_(False)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    contexts, schedule = sd.encode_prompt([""] + prompts), output_schedule(sd.schedule, args.prediction_type).to(device)
    sd.text_encoder = None  # the prompts are encoded: free it
    level_channels = [len(args.timesteps) * sum(unet.feature_info(n).channels for n in p + a) for p, a in level_names(unet)]
    frozen = Frozen(unet, vae, contexts, prompt_ids, schedule, level_channels)
    if args.compile:  # the two calls the feature paths make (a compiled module would only cover forward)
        unet.forward_with_features, unet.features = maybe_compile(unet.forward_with_features, True), maybe_compile(unet.features, True)

    # ---- train on the source domain, evaluate the unconditional branch everywhere
    variants = {"DIFF (no IPKL)" if args.no_ipkl else f"DIFF + IPKL ({args.consistency.upper()})": not args.no_ipkl}
    if args.demo and not args.no_ipkl and not args.no_baseline:  # same U-Net, steps and data, without IPKL
        variants["baseline: DIFF without IPKL"] = False
    metrics, rows = {}, []
    for i, (variant, ipkl) in enumerate(variants.items()):
        segmenter = fit(args, ipkl, args.out if i == 0 else args.out / "baseline", frozen, train_data, targets, num_classes, device, len(variants) - i)
        if i == 0:
            export(segmenter, frozen, sd, args, class_names, palette)
        if args.export:
            return
        print0(f"\n== {variant}")
        metrics[variant], shown = evaluate(segmenter, frozen, targets, num_classes, class_names, device, args)
        if i == 0:
            rows = [[image_to_uint8(im), overlay(im, pred, palette), overlay(im, lab, palette)] for d in shown.values() for im, pred, lab in d[:2]]
    if args.demo:  # the floor: every pixel background
        constant = lambda x: torch.zeros(len(x), *x.shape[-2:], dtype=torch.long, device=x.device)  # noqa: E731
        floor = {name: evaluate_semantic(constant, data, num_classes, device)[0] for name, data in targets.items()}
        metrics["baseline: all background"] = {name: round(100 * mean_iou(conf).item(), 2) for name, conf in floor.items()}
    if rows:
        save_grid(rows, args.out / "predictions.png", titles=["image", "prediction", "ground truth"], scale=2 if args.demo else 1)
    title = f"DIFF, trained on {'the clean synthetic style (DEMO)' if args.demo else args.source}, mIoU %"
    return finish_run(job, metrics, out=args.out, title=title, wrote="predictions.png")


if __name__ == "__main__":
    run(main)
