"""DIFF: diffusion feature fusion with implicit posterior knowledge learning (IPKL), for domain-
generalised segmentation: train on GTA5 (or Cityscapes), test on unseen Cityscapes, BDD100K,
Mapillary (or ACDC, Dark Zurich). `--demo`: a synthetic clean style -> an unseen hazy style.

Ji et al., "Diffusion Features to Bridge Domain Gap for Semantic Segmentation" (paper text:
../shared/design/papers/diff-ipkl.txt; facts checked against the official code Yux1angJi/DIFF:
configs/stridehyperfeature.yaml, diff_config.yaml, experiments.py, encoder_decoder.py).

    python recipes/diff_gta2cs.py --demo                                   # CPU, minutes, no download
    torchrun --nproc_per_node=4 recipes/diff_gta2cs.py --model stabilityai/stable-diffusion-2-1 \\
        --data-root /data --source gta5 --targets cityscapes bdd100k mapillary

Method (frozen SD 2.1; trainable: the fusion block and the decode head, shared by both branches):

    z_0 = E(image);  x_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε  for the K timesteps t, one batched U-Net call
    F(x, c) = ⊕_{t, l} [F_inter^{t,l}, F_attn^{t,l}]    every decoder ResNet output of up.1..3 and its
                                                         cross-attention map, per stride      eq. 1
    F_cond  = Σ_i M_i ⊙ F(x, C_i) / Σ_j M_j             C_0 = "" with M_0 = 1, C_i = prompt of a class
                                                         present in the label map, M_i its mask  eq. 2
    F_uncond = F(x, "")
    L = λ1 CE(D(F_conv(F_cond)), y) + λ2 ‖D(F_conv(F_cond)) − D(F_conv(F_uncond))‖²               eq. 3–5
    inference: D(F_conv(F_uncond)) only, whole image

| hyper-parameter | value | source |
|---|---|---|
| diffusion model | SD 2.1 (768-v), frozen; VAE and text encoder frozen | paper §III-A, official config `model_id` |
| timesteps | 91, 52, 30, 22, 18, 14, 11, 7, 3 (K = 9) | official diff_config.yaml: the 9 saved steps (`save_timestep`) of its 37-step trajectory (`scheduler_timesteps`) |
| layers | every ResNet of up levels 1–3 (3 each) + their 9 cross-attention maps | official `idxs_resnet`, `idxs_ca` (up level 0 is tapped there too, then unused) |
| fusion | per stride: concat over layers × timesteps → GN bottleneck block to 2048 / 1024 / 512 ch (strides 32 / 16 / 8) → top-down ×2 deconv + residual blocks → 256 ch at stride 4 | official `direct_aggregation` + `DiftStrideFinecoder` |
| decode head | DAFormer `sepaspp`: 256-d embeddings, separable ASPP dilations 1, 6, 12, 18, BN | paper §III-A "same decoder head as DAFormer", official daformer_sepaspp_diff.py |
| prompted classes | sidewalk, wall, rider, truck, train; template "A high quality photo; europe city; {name}, {description}" | official `label_map` (the other 14 are commented out) |
| λ1, λ2 | 1, 1 | paper §II-B2; official `mse_loss(..., lamb=1.0)` |
| consistency | L2 on the head's logits (KL option) | paper Table IV (L2 58.01 > KL 57.81) |
| optimiser | AdamW, lr 6e-5, head lr × 10, weight decay 0.01 | official experiments.py (`pmult`), DAFormer adamw.py |
| schedule | poly (power 1) to 0, 1500-iteration linear warm-up from 1e-6 | official `poly10warm` (DAFormer) |
| iterations, batch | 40 000, 1 image per GPU, 1 GPU | official experiments.py id 50 |
| crop | 512 × 512 from GTA5 resized to 1280 × 720 | official uda_gtaCAug_to_cityscapes_512x512.py |
| evaluation | whole image, Cityscapes at 1024 × 512, mIoU over 19 classes | official `inference = 'whole'`; DAFormer configs |

Notes. (1) The official code runs a 37-step stochastic DDIM inversion (η = 1 for 10 < t < 250,
classifier-free guidance 5) and fuses the class-prompted noise predictions by the masks at each
step, so the conditioning reaches the features through the trajectory; it keeps the features of
9 steps. Here the 9 noisy latents are forward-diffusion samples of z_0 computed in ONE batched
U-Net call (`unet_seg.taps.timestep_features`), and eq. 2 fuses the prompted *features* by the
masks (without a sequential trajectory, fusing noise predictions would not reach the features).
The empty-prompt row of that call is the unconditional branch. (2) Paper eq. 5 puts CE on the
conditional branch only; the official code also puts CE on the unconditional branch and does
not detach the teacher: `--uncond-ce 1` adds that CE; the teacher is detached here (the paper
calls it a teacher). (3) Not implemented: DAFormer's rare-class sampling and photometric
"CAug" augmentation of GTA5 (official `gtaCAug`, `rcs_T = 0.01`). (4) `--demo` cannot use
pretrained weights: it pre-trains the tiny U-Net for 100 steps as a text-conditioned denoiser on
*unlabelled* synthetic scenes of random looks (captions: the forms present), standing in for SD's
web-scale pre-training, with the weight-free `BlockCodec` in place of SD's VAE; then it trains
DIFF on the labelled clean style, segmenting the five forms (the codec keeps a block's texture
energy, not its pattern, so the 20 texture × form classes are out of reach), and tests on the
hazy style, next to the same model trained without IPKL and an all-background floor. What it
shows is the pipeline end to end, not the paper's gain: see the README for the measured numbers.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from unet_seg import load_sd
from unet_seg.codecs import BlockCodec
from unet_seg.data import synthetic
from unet_seg.demo import pretrain_denoiser
from unet_seg.diffusion import NoiseSchedule
from unet_seg.heads import DAFormerHead, DiffusionFeatureFusion
from unet_seg.losses import consistency_kl, consistency_l2, cross_entropy
from unet_seg.metrics import iou_table, mean_iou
from unet_seg.models import TINY_SD2, TINY_SD2_TEXT, CLIPTextEncoder, CLIPTokenizer, UNet
from unet_seg.segmentation import evaluate_semantic
from unet_seg.taps import fuse_by_masks, timestep_features
from unet_seg.train import (
    autocast, barrier, check_finite_everywhere, cleanup_distributed, init_distributed, latest_checkpoint,
    load_checkpoint, maybe_compile, parse_recipe_args, print0, progress, recipe_parser, resumable_loader,
    save_checkpoint, seed_everything, training_batches, write_metrics,
)  # fmt: skip
from unet_seg.viz import image_to_uint8, overlay, save_grid

TIMESTEPS = (91, 52, 30, 22, 18, 14, 11, 7, 3)  # official diff_config.yaml (see the table)
LEVELS = (1, 2, 3)  # up levels tapped: strides 32, 16, 8 of the image
PROMPT_TEMPLATE = "A high quality photo; europe city; {}"
PROMPTS = {  # official label_map: the five prompted Cityscapes train ids
    1: "sidewalk, Paths for pedestrian use",
    3: "wall, Outer walls of buildings or structures",
    12: "rider, People riding bicycles, motorcycles",
    14: "truck, Larger vehicles used for cargo transport",
    16: "train, Vehicles on railway tracks",
}
DEMO = dict(size=64, steps=300, batch_size=8, lr=1e-3, warmup=30, eval_images=96, pretrain_steps=100, timesteps=(91, 30, 7))
REAL = dict(size=512, steps=40000, batch_size=1, lr=6e-5, warmup=1500, eval_images=0, pretrain_steps=0, timesteps=TIMESTEPS)


def parse_args(argv=None) -> argparse.Namespace:
    p = recipe_parser(
        "DIFF + IPKL domain-generalised segmentation: train on a source domain, report mIoU on unseen target domains. "
        "--demo runs on CPU with tiny random models and synthetic styles (no download); otherwise give --data-root.",
        DEMO, REAL, out="runs/diff",
    )  # fmt: skip
    p.add_argument("--data-root", help="folder holding gta5/, cityscapes/, bdd100k/, mapillary/, acdc/, darkzurich/")
    p.add_argument("--source", default="gta5", choices=("gta5", "cityscapes"), help="training domain")
    p.add_argument("--targets", nargs="+", default=["cityscapes", "bdd100k", "mapillary"], help="unseen test domains (val splits)")
    p.add_argument("--consistency", default="l2", choices=("l2", "kl"), help="IPKL consistency loss (paper Table IV)")
    p.add_argument("--no-ipkl", action="store_true", help="train the unconditional branch alone with CE (Table IV, 'DIFF' row)")
    p.add_argument("--no-baseline", action="store_true", help="demo: skip training the no-IPKL baseline")
    p.add_argument("--uncond-ce", type=float, default=0.0, help="weight of CE on the unconditional branch (official code: 1)")
    p.add_argument("--timesteps", type=int, nargs="+", help=f"diffusion timesteps tapped (default {REAL['timesteps']}, demo {DEMO['timesteps']})")
    p.add_argument("--warmup", type=int, help=f"linear warm-up steps ({REAL['warmup']}, demo {DEMO['warmup']})")
    p.add_argument("--eval-images", type=int, help="images per target domain (0: all; demo 96)")
    p.add_argument("--pretrain-steps", type=int, help="demo only: denoising pre-training steps of the tiny U-Net (100)")
    args = parse_recipe_args(p, argv, DEMO, REAL)
    if not args.demo and not args.data_root:
        p.error("--data-root is required without --demo")
    return args


# ---------------------------------------------------------------------------------------------
# DIFF features


def level_names(unet) -> list[tuple[list[str], list[str]]]:
    """Per tapped up level: (its ResNet outputs `up.i.res.j`, its cross-attention layers)."""
    return [
        (
            [f"up.{i}.res.{j}" for j in range(len(unet.up_blocks[i].resnets))],
            [n for n in unet.attention_names if n.startswith(f"up.{i}.attn.") and n.endswith(".cross")],
        )
        for i in LEVELS
    ]


def diffusion_levels(unet, z0, context, noise, timesteps, schedule) -> list[torch.Tensor]:
    """z0 [N, 4, h, w], context [N, 77, D], noise [N, K, 4, h, w], K timesteps -> per tapped level, coarse to
    fine, the concatenation over layers, timesteps and cross-attention maps [N, C_level, h_i, w_i]
    (eq. 1's ⊕), from one U-Net call over the N·K noisy latents."""
    levels = level_names(unet)
    feats = timestep_features(
        unet, z0, timesteps, context, [n for names, _ in levels for n in names],
        schedule=schedule, attention_maps=[m for _, maps in levels for m in maps], noise=noise,
    )  # fmt: skip
    return [torch.cat([feats[n].flatten(1, 2) for n in names + maps], dim=1) for names, maps in levels]


def branch_features(unet, z0, label, contexts, prompt_ids, timesteps, schedule, noise, conditional: bool):
    """The inputs of both branches from one U-Net call.

    z0 [B, 4, h, w]; label [B, H, W] (255 ignore); contexts [1 + P, 77, D]: row 0 the empty
    prompt, row i the prompt of class prompt_ids[i − 1]. Returns (unconditional levels,
    conditional levels or None): the empty prompt's features, and eq. 2's mask fusion of the
    empty prompt (mask 1) with the prompts of the classes present in each image (their masks).
    Images are padded to the same number of prompts with empty prompts of mask 0."""
    b = z0.shape[0]
    present = [[i + 1 for i, c in enumerate(prompt_ids) if bool((y == c).any())] for y in label] if conditional else [[]] * b
    p = 1 + max(len(slots) for slots in present)
    slots = torch.tensor([[0] + s + [0] * (p - 1 - len(s)) for s in present], device=z0.device)  # [B, P]
    rows = z0[:, None].expand(b, p, *z0.shape[1:]).flatten(0, 1)
    eps = noise[:, None].expand(b, p, *noise.shape[1:]).flatten(0, 1)
    levels = diffusion_levels(unet, rows, contexts[slots.flatten()], eps, timesteps, schedule)
    levels = [f.unflatten(0, (b, p)) for f in levels]
    uncond = [f[:, 0] for f in levels]
    if not conditional:
        return uncond, None
    ids = torch.tensor([0, *prompt_ids], device=z0.device)[slots]  # class of each slot (slot 0: unused)
    masks = ((label[:, None] == ids[:, :, None, None]) & (slots > 0)[:, :, None, None]).float()
    masks[:, 0] = 1.0
    return uncond, [fuse_by_masks(f, masks) for f in levels]


class Segmenter(nn.Module):
    """The trainable part shared by both branches: D(F_conv(levels)) -> logits at stride 4."""

    def __init__(self, level_channels, num_classes: int, dims, fine_dim: int, embed_dim: int, groups: int):
        super().__init__()
        self.fusion = DiffusionFeatureFusion(level_channels, dims, fine_dim, bottleneck_groups=groups // 2, groups=groups)
        self.head = DAFormerHead(self.fusion.out_channels, num_classes, embed_dim)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.fusion(levels))


# ---------------------------------------------------------------------------------------------
# Training and inference


def train_step(model, frozen: Frozen, opt, image, label, ipkl: bool, args) -> dict:
    """One optimiser step of eq. 5 (or of CE on the unconditional branch alone, without IPKL)."""
    with torch.no_grad(), autocast(image.device):
        z0 = frozen.vae.encode(image, sample=True)
        noise = torch.randn(z0.shape[0], len(args.timesteps), *z0.shape[1:], device=z0.device, dtype=z0.dtype)
        uncond, cond = branch_features(
            frozen.unet, z0, label, frozen.contexts, frozen.prompt_ids, args.timesteps, frozen.schedule, noise, ipkl
        )
    with autocast(image.device):
        batch = [torch.cat([c, u]) for c, u in zip(cond, uncond)] if ipkl else uncond
        logits = F.interpolate(model(batch).float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    losses = {}
    if ipkl:
        logits_c, logits_u = logits.chunk(2)
        losses["CE cond"] = cross_entropy(logits_c, label)  # eq. 3
        consistency = consistency_l2 if args.consistency == "l2" else consistency_kl
        losses["consistency"] = consistency(logits_u, logits_c)  # eq. 4, teacher detached
        if args.uncond_ce:
            losses["CE uncond"] = args.uncond_ce * cross_entropy(logits_u, label)
    else:
        losses["CE uncond"] = cross_entropy(logits, label)
    loss = check_finite_everywhere(sum(losses.values()), "DIFF loss")  # eq. 5, λ1 = λ2 = 1
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {k: v.item() for k, v in losses.items()}


@torch.no_grad()
def predict_logits(segmenter, frozen: Frozen, image, timesteps, seed: int) -> torch.Tensor:
    """Inference, the unconditional branch only: image [B, 3, H, W] -> logits [B, K, H/4, W/4].
    The diffusion noise is drawn from `seed`, so predictions do not depend on the global RNG."""
    with autocast(image.device):
        z0 = frozen.vae.encode(image)
        g = torch.Generator(image.device).manual_seed(seed)
        noise = torch.randn(z0.shape[0], len(timesteps), *z0.shape[1:], device=z0.device, generator=g).to(z0.dtype)
        context = frozen.contexts[:1].expand(z0.shape[0], -1, -1)
        return segmenter(diffusion_levels(frozen.unet, z0, context, noise, timesteps, frozen.schedule)).float()


def poly_with_warmup(total: int, warmup: int):
    """DAFormer's `poly10warm`: lr · (1 − s/total), ramped linearly from 1e-6 · lr over `warmup` steps."""

    def factor(step: int) -> float:
        ramp = 1.0 if step >= warmup else 1 - (1 - step / warmup) * (1 - 1e-6)
        return ramp * max(0.0, 1 - step / total)

    return factor


# ---------------------------------------------------------------------------------------------
# Demo stand-ins: the task and SD's pre-training

DEMO_CLASSES = ("background", *synthetic.FORMS)
_FORM_OF_CLASS = torch.tensor(
    [0] + [1 + synthetic.FORMS.index(n.split()[1]) for n in synthetic.CLASS_NAMES[1:]] + [255] * (256 - len(synthetic.CLASS_NAMES))
)


class FormScenes(torch.utils.data.Dataset):
    """`synthetic.SemanticScenes` labelled by form only (background + disc, ring, square, triangle,
    cross): the 8×8 block codec keeps a block's colour and texture *energy*, not its pattern, so
    the textures that split the 20 synthetic classes are invisible in its latents."""

    def __init__(self, seed: int, length: int, size: int, style: synthetic.Style):
        self.scenes = synthetic.SemanticScenes(seed, length, size, style=style)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.scenes[i]
        return image, _FORM_OF_CLASS[label]



def caption_forms(labels: torch.Tensor, text_encoder, tokenizer) -> torch.Tensor:
    """Demo pre-training's captions: the forms present in each label map [B, H, W] ("disc, ring"),
    encoded -> [B, 77, D]."""
    forms = [_FORM_OF_CLASS[y.unique().cpu()].unique().tolist() for y in labels]
    captions = [", ".join(DEMO_CLASSES[f] for f in present if 0 < f < 255) for present in forms]
    return text_encoder(tokenizer(captions).to(labels.device))


# ---------------------------------------------------------------------------------------------


@dataclass
class Frozen:
    """The frozen diffusion side shared by both branches and by every model trained in one run."""

    unet: UNet
    vae: nn.Module
    contexts: torch.Tensor  # [1 + P, 77, D]: the empty prompt, then one prompt per prompted class
    prompt_ids: list[int]
    schedule: NoiseSchedule
    level_channels: list[int]


def fit(args, ipkl: bool, out: Path, frozen: Frozen, train_data, num_classes: int, device, world: int, local_rank: int):
    """Train a fresh fusion block + head on the source domain (eq. 5, or CE alone without IPKL),
    resuming from `out` with --resume; returns the trained `Segmenter`."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    dims, fine_dim, embed_dim, groups = ((128, 64, 32), 32, 32, 8) if args.demo else ((2048, 1024, 512), 256, 256, 32)
    segmenter = Segmenter(frozen.level_channels, num_classes, dims, fine_dim, embed_dim, groups).to(device).train()
    if device.type == "cuda":
        segmenter.to(memory_format=torch.channels_last)
        if world > 1:
            segmenter = nn.SyncBatchNorm.convert_sync_batchnorm(segmenter)
    models = {"segmenter": segmenter} | ({"unet": frozen.unet} if args.demo else {})  # the demo's U-Net is trained here
    opt = torch.optim.AdamW(
        [
            {"params": segmenter.fusion.parameters(), "lr": args.lr},
            {"params": segmenter.head.parameters(), "lr": 10 * args.lr},
        ],
        betas=(0.9, 0.999),
        weight_decay=0.01,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_with_warmup(args.steps, args.warmup))
    step = 0
    if args.resume and latest_checkpoint(out) is not None:
        step = load_checkpoint(latest_checkpoint(out), models, opt, sched).step
        print0(f"resumed {out} from step {step}")
    model = DDP(segmenter, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else segmenter
    model = maybe_compile(model, args.compile)
    loader = resumable_loader(train_data, args.batch_size, args.seed, num_workers=0 if args.demo else 4)
    bar = progress(total=args.steps, initial=step, desc="DIFF + IPKL" if ipkl else "DIFF (no IPKL)")
    for step, epoch, batch in training_batches(loader, step, args.steps):
        image, label = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        losses = train_step(model, frozen, opt, image.to(device), label.to(device), ipkl, args)
        sched.step()
        bar.update()
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        if step % max(1, args.steps // 10) == 0:  # also for logs, where the bar is silent
            print0(f"step {step}/{args.steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(out, step, models, opt, sched, epoch, extra={"args": str(vars(args))}, keep_last=2)
    bar.close()
    return segmenter.eval()


def evaluate(segmenter, frozen: Frozen, targets: dict, num_classes: int, class_names, device, args):
    """mIoU of the unconditional branch on every domain -> ({domain: mIoU %}, rows of overlays)."""
    predict = lambda x: predict_logits(segmenter, frozen, x, args.timesteps, args.seed)  # noqa: E731
    metrics, shown = {}, {}
    for name, data in targets.items():
        conf, shown[name] = evaluate_semantic(predict, data, num_classes, device, batch_size=8 if args.demo else 1)
        metrics[name] = round(100 * mean_iou(conf).item(), 2)
        print0(f"\n{name}: mIoU {metrics[name]:.2f}\n" + iou_table(conf, class_names))
    return metrics, shown


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    rank, world, local_rank, device = init_distributed()
    if args.demo:
        print0(
            f"DEMO: tiny SD-structured U-Net pre-trained here for {args.pretrain_steps} steps on unlabelled synthetic scenes, "
            "a frozen 8x8 block codec in place of SD's VAE, synthetic clean -> hazy styles segmented by form, "
            f"{device.type.upper()}, no download (real runs: --model <SD 2.x> --data-root <GTA5, Cityscapes, ...>)"
        )
    seed_everything(args.seed, rank)
    args.out.mkdir(parents=True, exist_ok=True)

    # ---- data: a labelled source domain; unseen target domains for evaluation only
    if args.demo:
        num_classes, class_names, palette = len(DEMO_CLASSES), DEMO_CLASSES, None
        train_data = FormScenes(args.seed, 100_000, args.size, synthetic.CLEAN_STYLE)
        targets = {
            "clean (source style)": FormScenes(args.seed + 1, args.eval_images, args.size, synthetic.CLEAN_STYLE),
            "hazy (unseen style)": FormScenes(args.seed + 1, args.eval_images, args.size, synthetic.HAZY_STYLE),
        }
        prompt_ids = list(range(1, num_classes))
        prompts = list(class_names[1:])
    else:
        from unet_seg.data.driving import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, LAYOUTS, DrivingScenes
        from unet_seg.data.transforms import RandomResizeCropFlip, ResizeImage

        root = Path(args.data_root)
        num_classes, class_names = len(CITYSCAPES_CLASSES), CITYSCAPES_CLASSES
        palette = np.array(CITYSCAPES_PALETTE, np.uint8)
        crop = RandomResizeCropFlip((args.size, args.size), LAYOUTS[args.source].scale, (1.0, 1.0))
        train_data = DrivingScenes(args.source, root / args.source, "train", crop, seed=args.seed)
        targets = {n: DrivingScenes(n, root / n, "val", ResizeImage(LAYOUTS[n].scale)) for n in args.targets}
        if args.eval_images:
            targets = {n: torch.utils.data.Subset(d, range(min(args.eval_images, len(d)))) for n, d in targets.items()}
        prompt_ids = list(PROMPTS)
        prompts = [PROMPT_TEMPLATE.format(PROMPTS[c]) for c in prompt_ids]

    # ---- the frozen diffusion side (demo: pre-trained here), prompt contexts computed once
    if args.demo:
        torch.manual_seed(args.seed)
        unet, vae = UNet(TINY_SD2).to(device), BlockCodec().to(device)
        text_encoder, tokenizer = CLIPTextEncoder(TINY_SD2_TEXT).to(device), CLIPTokenizer.from_bpe(pad_token="!")
        text_encoder.eval().requires_grad_(False)
        schedule = NoiseSchedule.sd("epsilon")
        if not (args.resume and latest_checkpoint(args.out) is not None):  # else the checkpoint holds it
            captions = partial(caption_forms, text_encoder=text_encoder, tokenizer=tokenizer)
            loss = pretrain_denoiser(unet, vae, schedule, args.pretrain_steps, args.size, args.seed, captions, batch_size=8, device=device)
            print0(f"pre-trained the tiny U-Net for {args.pretrain_steps} steps: denoising loss {loss:.3f}")
    else:
        sd = load_sd(args.model, device=device, components=("unet", "vae", "text_encoder", "tokenizer"))
        unet, vae, text_encoder, tokenizer, schedule = sd.unet, sd.vae, sd.text_encoder, sd.tokenizer, sd.schedule
    unet.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    with torch.no_grad():
        contexts = text_encoder(tokenizer([""] + prompts).to(device))
        schedule = schedule.to(device)
        probe = torch.zeros(1, 4, unet.downscale, unet.downscale, device=device)  # the channels of each level
        noise = torch.zeros(1, len(args.timesteps), *probe.shape[1:], device=device)
        level_channels = [f.shape[1] for f in diffusion_levels(unet, probe, contexts[:1], noise, args.timesteps, schedule)]
    del text_encoder
    frozen = Frozen(unet, vae, contexts, prompt_ids, schedule, level_channels)
    if args.compile:
        unet.compile()

    # ---- train on the source domain, evaluate the unconditional branch everywhere
    variants = {"DIFF (no IPKL)" if args.no_ipkl else f"DIFF + IPKL ({args.consistency.upper()})": not args.no_ipkl}
    if args.demo and not args.no_ipkl and not args.no_baseline:  # same U-Net, steps and data, without IPKL
        variants["baseline: DIFF without IPKL"] = False
    metrics, rows = {}, []
    for i, (variant, ipkl) in enumerate(variants.items()):
        segmenter = fit(args, ipkl, args.out if i == 0 else args.out / "baseline", frozen, train_data, num_classes, device, world, local_rank)
        print0(f"\n== {variant}")
        metrics[variant], shown = evaluate(segmenter, frozen, targets, num_classes, class_names, device, args)
        if i == 0:
            rows = [
                [image_to_uint8(im), overlay(im, pred, palette), overlay(im, lab, palette)]
                for domain in shown.values()
                for im, pred, lab in domain[:2]
            ]
    if args.demo:  # the floor: every pixel background
        constant = lambda x: torch.zeros(len(x), *x.shape[-2:], dtype=torch.long, device=x.device)  # noqa: E731
        metrics["baseline: all background"] = {
            name: round(100 * mean_iou(evaluate_semantic(constant, data, num_classes, device)[0]).item(), 2)
            for name, data in targets.items()
        }
    wall = time.perf_counter() - started
    title = f"DIFF, trained on {'the clean synthetic style (DEMO)' if args.demo else args.source}, mIoU %"
    table = write_metrics(metrics, args.out / "metrics", title=title)
    if rows and rank == 0:
        save_grid(rows, args.out / "predictions.png", titles=["image", "prediction", "ground truth"], scale=2 if args.demo else 1)
    print0("\n" + table)
    print0(f"total {wall:.0f} s on {world} process(es); wrote {args.out}/metrics.md, .json, predictions.png")
    barrier()
    cleanup_distributed()
    return metrics


if __name__ == "__main__":
    main()
