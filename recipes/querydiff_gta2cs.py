"""QueryDiff domain-generalised segmentation: train on GTA5, evaluate on Cityscapes / BDD100K /
Mapillary; or, with `--demo`, train on synthetic CLEAN scenes and evaluate on the held-out HAZY style.

Li et al., "Better to Teach than to Give: Domain Generalized Semantic Segmentation via Agent
Queries with Diffusion Model Guidance", ICML 2025 (overview: ../shared/design/papers/querydiff-blog.txt;
facts checked against the official release FanLiHub/QueryDiff: configs/_base_/models/
rein_dinov2_mask2former.py, configs/dinov2/dinov2_mask2former_512x512_bs1x4.py,
QueryDiff/seg_model/backbones/{dino_v2,reins_dinov2}.py, heads/refine_mask2former.py; Rein from
w1oves/Rein rein/models/backbones/reins.py).

    python recipes/querydiff_gta2cs.py --demo                       # CPU, minutes, no download, no timm
    pip install -e ".[recipes]"                                     # timm, for the DINOv2 / ResNet backbones
    torchrun --nproc_per_node=4 recipes/querydiff_gta2cs.py --model stabilityai/stable-diffusion-2-1 \\
        --gta-root /data/gta --cityscapes-root /data/cityscapes --bdd-root /data/bdd100k \\
        --mapillary-root /data/mapillary

Method (training step; everything under "diffusion guidance" is skipped at inference):

    f_1..f_4   = backbone(x)                               4 stages, strides 4, 8, 16, 32
    q          = AgentQueries(f_1..f_4)                    q_init → stage queries → progressive merge, [B, r, d]
    -- diffusion guidance (training only, frozen SD) --
    z          = E(x);  F_w, F_s = U-Net features of z noised to t_w and t_s, ONE batched forward
    S          = q P_w(F_w)ᵀ / √d                          similarity of agents and weak features
    L_dist     = KL(softmax_N P_s(F_s) ‖ softmax_N(qᵀ softmax_r S))       rebuild the strong features
    L_sup      = ‖q − sg(softmax_N(S) P_s(F_s)ᵀ)‖²          agents pulled to the cleaned map
    -- segmentation --
    F'_l       = F_l + Attn(LN(F_l), q)                     refinement of every pixel-decoder level
    (p_i, m_i) = Mask2Former decoder, queries Linear(q), query positions q
    L          = Σ_layers [2·CE(p) + 5·BCE(m) + 5·Dice(m)] (Hungarian-matched)  +  λ·(L_dist + L_sup)

| hyper-parameter | value | source |
|---|---|---|
| backbone | DINOv2 ViT-L, patch 16 (resampled from 14), frozen + Rein (LoRA tokens, rank 16, m = 100) | official config `ReinsDinoVisionTransformer`, `LoRAReins` |
| backbone stages | blocks 7, 11, 15, 23 resized to strides 4, 8, 16, 32 | official `out_indices`, `dino_v2.py` |
| agent queries | r = 100, progressive merging over the 4 stages | paper Fig. 5 (r = 100 best); blog §1 |
| diffusion model | SD 2.x, frozen, empty prompt, VAE posterior mean | official `DiffusionTrainer_('model/stable-diffusion-2')`; paper Table 6 (1.4/1.5/2.1 equal) |
| diffusion features | up-block ResNets 0..2 of levels 1, 2, 3 (`up.{1,2,3}.res.{0,1,2}`) | official `layer_indexes` |
| t_w, t_s | 0, 100 (of 1000) | official `feature_extraction(x, 0)`, `(x, 100)` |
| DCL weights | L_dist 1, L_sup 1 | official: both added unweighted to the loss dict |
| decoder | Mask2Former, 100 queries, 9 layers, 3 levels, d 256, 8 heads, FFN 2048 | official config |
| decoder queries | Linear(agent queries), positions = agent queries | official `replace_query_feat=True` |
| mask loss | CE 2.0 (no-object 0.1), BCE 5.0, Dice 5.0; matching costs 2 / 5 / 5; 12544 points | official config |
| optimiser | AdamW lr 1e-4, wd 0.05 (none on norms, tokens, embeddings), β (0.9, 0.999) | official config |
| schedule | poly, power 0.9, 40 000 iterations, batch 2 per GPU | official config |
| training crops | short side 256..1024, random 512² crop, flip | official `RandomChoiceResize` + `RandomCrop` |
| evaluation | sliding window 512², stride 341 | official `test_cfg` |
| reported | GTA→Cityscapes 69.1 mIoU (DINOv2), BDD100K, Mapillary | paper Table 1 |

Notes. (1) The agent queries here come from the backbone's stage features (the paper's
description, `unet_seg.attention.AgentQueries`); the released code instead merges Rein's
per-layer learnable tokens (24 → 12 → 6 → 3 layer groups, mean, MLP), which do not depend on
the image. (2) DCL is `unet_seg.losses.diffusion_consistency_loss`, our reading of the paper's
equations (see its docstring). The released code differs in places it is internally
inconsistent (its shapes do not compose): KL over channels, L_sup as a Huber loss against the
*weak* features aggregated by S, and learned MLPs on both sides. P_w is a learned 1×1 conv per
tapped layer; P_s is a frozen random projection (seeded, saved in checkpoints) followed by a
per-channel spatial standardisation, so the target cannot collapse through training, summed
over layers on the finest tapped grid (the latent grid). (3) The refinement is
`AgentRefinement` (residual, one module shared by all levels); the release adds 4 dilated
depth-wise convolutions over the concatenated refined levels. (4) The pixel decoder is a plain
FPN instead of the 6-layer multi-scale deformable-attention encoder; mask losses use 12544
uniformly drawn points, one set for matching and loss (Mask2Former draws importance-sampled
points for the loss). (5) No PhotoMetricDistortion (not among the shared transforms).
(6) `--demo` cannot download anything: a small conv backbone trained in full, d = 64, 3 decoder
layers, 64² images of 5 synthetic classes (one per form), trained on the CLEAN style and tested
on the held-out HAZY style. The teacher is a tiny SD2-structured U-Net (`DEMO_TEACHER`) with the
frozen weight-free `BlockCodec` as its "VAE", pre-trained for a few hundred steps as a denoiser
on unlabelled scenes in random looks (`synthetic.random_style`, never the hazy style): SD's
web-scale pre-training in miniature, as in the DIFF demo. The control is the same model, same
initial weights, data order and loss points, trained with λ = 0 (no diffusion branch at all).
Measured (300 steps, hazy mIoU on 100 images, seeds 0 / 1): without DCL 20.87 / 20.14; with DCL
and a random TINY_SD2 teacher 19.66 / 20.97, with the pre-trained teacher 19.40 / 19.93, and at
t_s = 500 19.24 / 19.64, with a teacher pre-trained 1000 steps 20.99 / 20.44 (its control
22.19 / 20.35, run on a GPU) — DCL does not beat the control here (the seed-to-seed spread is about
one point); the clean style drops as well (22.74 / 25.55 without, 22.46 / 22.95 with). The tiny
model is far from converged (≈ 21 mIoU after 300 steps) and the clean-to-hazy gap is only 2-5
points, so a regulariser of the queries has little room to show; whether SD 2.1's features
carry the style-free layout the paper relies on is not testable without its weights.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from unet_seg import load_sd
from unet_seg.attention import AgentQueries, AgentRefinement
from unet_seg.codecs import BlockCodec
from unet_seg.data.synthetic import CLASS_NAMES, CLEAN_STYLE, HAZY_STYLE, SemanticScenes, fold_split
from unet_seg.demo import pretrain_denoiser
from unet_seg.diffusion import NoiseSchedule
from unet_seg.losses import diffusion_consistency_loss, dice_loss
from unet_seg.matching import linear_sum_assignment
from unet_seg.metrics import iou_per_class, iou_table
from unet_seg.models import TINY_SD2, TINY_SD2_TEXT, CLIPTextEncoder, CLIPTokenizer, UNet
from unet_seg.segmentation import evaluate_semantic, slide_logits
from unet_seg.taps import timestep_features
from unet_seg.train import (
    autocast, barrier, check_finite_everywhere, cleanup_distributed, init_distributed, latest_checkpoint,
    load_checkpoint, maybe_compile, parse_recipe_args, print0, progress, recipe_parser, resumable_loader,
    save_checkpoint, seed_everything, write_metrics,
)  # fmt: skip
from unet_seg.viz import image_to_uint8, overlay, save_grid

IGNORE = 255
T_WEAK, T_STRONG = 0, 100  # official feature_extraction(x, 0) and (x, 100)
TAPS = tuple(f"up.{i}.res.{j}" for i in (1, 2, 3) for j in range(3))  # official up_blocks[1..3].resnets[0..2]
LOSS_WEIGHTS = dict(cls=2.0, bce=5.0, dice=5.0, no_object=0.1)  # official Mask2Former config
CROP, STRIDE = (512, 512), (341, 341)  # official test_cfg (slide)
DEMO_TEACHER = replace(TINY_SD2, channels=(32, 64, 64, 64))  # a quarter of TINY_SD2's FLOPs: CPU minutes
DEMO_CLASSES = fold_split(0)[1]  # 5 synthetic classes, one per form: striped disc, checkered ring, ...
DEMO = dict(size=64, steps=300, batch_size=8, lr=1e-3, dim=64, heads=4, decoder_layers=3, ffn=128, points=1024, eval_images=100, teacher_steps=200)
REAL = dict(size=512, steps=40000, batch_size=2, lr=1e-4, dim=256, heads=8, decoder_layers=9, ffn=2048, points=12544, eval_images=0, teacher_steps=0)


def parse_args(argv=None) -> argparse.Namespace:
    p = recipe_parser(
        "QueryDiff: domain-generalised segmentation with agent queries taught by a frozen diffusion model during "
        "training only (--model is loaded for training alone). --demo runs on CPU with tiny random models and "
        "synthetic data, no timm (train CLEAN, test HAZY), and also trains the same model without DCL.",
        DEMO, REAL, out="runs/querydiff",
    )  # fmt: skip
    p.add_argument("--backbone", default="dinov2", choices=("dinov2", "resnet50"), help="timm backbone (real runs)")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (tests, benchmarks)")
    p.add_argument("--gta-root", help="GTA5 root (unet_seg.data.driving layout), the training set")
    p.add_argument("--cityscapes-root", help="Cityscapes root, evaluated on val")
    p.add_argument("--bdd-root", help="BDD100K root, evaluated on val")
    p.add_argument("--mapillary-root", help="Mapillary Vistas root, evaluated on validation")
    p.add_argument("--dcl-weight", type=float, default=1.0, help="λ of L_dist + L_sup (0: no diffusion branch)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, help="also train the model without DCL (default: on with --demo)")
    p.add_argument("--t-weak", type=int, default=T_WEAK, help="weak-noise timestep t_w (of 1000)")
    p.add_argument("--t-strong", type=int, default=T_STRONG, help="strong-noise timestep t_s (of 1000)")
    p.add_argument("--queries", type=int, default=100, help="agent queries r (= decoder queries)")
    p.add_argument("--eval-images", type=int, help="demo: test images per style (real: 0 = whole val sets)")
    p.add_argument("--teacher-steps", type=int, help="demo only: denoising pre-training steps of the tiny U-Net teacher (200)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the latest checkpoints in --out (SD is never loaded)")
    args = parse_recipe_args(p, argv, DEMO, REAL)
    if args.compare is None:
        args.compare = args.demo
    if not args.demo and not args.eval_only and not args.gta_root:
        p.error("--gta-root is required without --demo")
    if args.queries < 1 or args.dcl_weight < 0:
        p.error("--queries must be >= 1 and --dcl-weight >= 0")
    return args


# ---------------------------------------------------------------------------------------------
# Backbones: images [B, 3, H, W] in [-1, 1] -> 4 feature maps at strides 4, 8, 16, 32; `.channels`


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(8, c_out), nn.ReLU(inplace=True))


class ConvBackbone(nn.Module):
    """The demo's small CNN, trained in full: a stride-4 stem, then one stride-2 stage per level."""

    def __init__(self, channels: Sequence[int] = (32, 64, 96, 128)):
        super().__init__()
        self.channels = tuple(channels)
        c = self.channels
        self.stem = nn.Sequential(_conv(3, c[0] // 2, 2), _conv(c[0] // 2, c[0], 2), _conv(c[0], c[0], 1))
        self.stages = nn.ModuleList([nn.Sequential(_conv(c[i - 1], c[i], 2), _conv(c[i], c[i], 1)) for i in range(1, len(c))])

    def forward(self, x: Tensor) -> list[Tensor]:
        out = [self.stem(x)]
        for stage in self.stages:
            out.append(stage(out[-1]))
        return out


def _imagenet_normalise(x: Tensor) -> Tensor:
    mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


class Reins(nn.Module):
    """Rein (Wei et al., CVPR 2024) with LoRA tokens: per ViT layer l, tokens T_l = A_l B_l [m, C]
    refine the patch features f [B, N, C] (the prefix tokens pass unchanged):

        a  = softmax_m(f T_lᵀ / √C)                      [B, N, m]
        f ← f + s · MLP_Δ(a[:, :, 1:] MLP_T(T_l[1:]) + f)   s a learnable scalar, 1e-3 at start
    """

    def __init__(self, layers: int, dim: int, tokens: int = 100, rank: int = 16, patch: int = 16):
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch * patch + math.sqrt(dim * rank)))  # Rein's LoRA init
        self.tokens_a = nn.Parameter(torch.empty(layers, tokens, rank).uniform_(-bound, bound))
        self.tokens_b = nn.Parameter(torch.empty(layers, rank, dim).uniform_(-bound, bound))
        self.scale = nn.Parameter(torch.tensor(1e-3))
        self.token_to_feat = nn.Linear(dim, dim)
        self.delta = nn.Linear(dim, dim)

    def forward(self, x: Tensor, layer: int, prefix: int) -> Tensor:
        head, f = x[:, :prefix], x[:, prefix:]
        t = self.tokens_a[layer] @ self.tokens_b[layer]
        a = (f @ t.T * f.shape[-1] ** -0.5).softmax(-1)
        delta = self.delta(a[..., 1:] @ self.token_to_feat(t[1:]) + f)
        return torch.cat([head, f + self.scale * delta], dim=1)


class ReinDINOv2(nn.Module):
    """timm's DINOv2 ViT-L (frozen, patch embedding resampled to 16) with trainable Reins; the
    outputs of blocks 7, 11, 15, 23 resized ×4, ×2, ×1, ×½ (as the release does)."""

    def __init__(self, pretrained: bool = True, img_size: int = 512, out_indices=(7, 11, 15, 23)):
        super().__init__()
        import timm  # the `recipes` extra

        self.vit = timm.create_model(
            "vit_large_patch14_dinov2.lvd142m", pretrained=pretrained, patch_size=16, img_size=img_size, dynamic_img_size=True
        )
        self.vit.requires_grad_(False)
        self.reins = Reins(len(self.vit.blocks), self.vit.embed_dim)
        self.out_indices = tuple(out_indices)
        self.channels = (self.vit.embed_dim,) * 4

    def forward(self, x: Tensor) -> list[Tensor]:
        b, _, h, w = x.shape
        t = self.vit.norm_pre(self.vit._pos_embed(self.vit.patch_embed(_imagenet_normalise(x))))
        prefix, outs = self.vit.num_prefix_tokens, []
        for i, block in enumerate(self.vit.blocks):
            t = self.reins(block(t), i, prefix)
            if i in self.out_indices:
                outs.append(t[:, prefix:].transpose(1, 2).reshape(b, -1, h // 16, w // 16))
        return [F.interpolate(f, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else f for f, s in zip(outs, (4, 2, 1, 0.5))]


class TimmCNN(nn.Module):
    """A timm CNN (e.g. ResNet-50) trained in full, its 4 stages of strides 4..32."""

    def __init__(self, name: str, pretrained: bool = True):
        super().__init__()
        import timm  # the `recipes` extra

        self.net = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=(1, 2, 3, 4))
        self.channels = tuple(self.net.feature_info.channels())

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.net(_imagenet_normalise(x))


# ---------------------------------------------------------------------------------------------
# Segmentation model: agent queries, refinement, Mask2Former-style decoder


def sine_position(h: int, w: int, dim: int, like: Tensor) -> Tensor:
    """DETR-style 2-D sine encoding of an h×w grid -> [h·w, dim] (dim a multiple of 4)."""
    f = dim // 4
    freq = 10000.0 ** (-torch.arange(f, device=like.device, dtype=torch.float32) / f)
    y = ((torch.arange(h, device=like.device) + 0.5) / h * 2 * math.pi)[:, None] * freq
    x = ((torch.arange(w, device=like.device) + 0.5) / w * 2 * math.pi)[:, None] * freq
    pos = torch.cat([y.sin()[:, None].expand(h, w, f), y.cos()[:, None].expand(h, w, f),
                     x.sin()[None].expand(h, w, f), x.cos()[None].expand(h, w, f)], dim=-1)  # fmt: skip
    return pos.flatten(0, 1).to(like.dtype)


class PixelDecoder(nn.Module):
    """FPN over the 4 stages -> (mask features [B, d, H/4, W/4], memories at strides 32, 16, 8)."""

    def __init__(self, stage_channels: Sequence[int], dim: int):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(8, dim)) for c in stage_channels])
        self.output = nn.ModuleList([_conv(dim, dim, 1) for _ in stage_channels])

    def forward(self, stages: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        x, outs = None, []
        for i in reversed(range(len(stages))):
            lat = self.lateral[i](stages[i])
            x = lat if x is None else lat + F.interpolate(x, size=lat.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output[i](x))
        return outs[-1], outs[:3]


class DecoderLayer(nn.Module):
    """Mask2Former layer: masked cross-attention to one level, self-attention, FFN (post-norm)."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])

    def forward(self, q: Tensor, pos: Tensor, memory: Tensor, memory_pos: Tensor, attn_mask: Tensor) -> Tensor:
        mask = attn_mask.repeat_interleave(self.heads, dim=0)  # True = not attended
        q = self.norms[0](q + self.cross(q + pos, memory + memory_pos, memory, attn_mask=mask, need_weights=False)[0])
        q = self.norms[1](q + self.self_attn(q + pos, q + pos, q, need_weights=False)[0])
        return self.norms[2](q + self.ffn(q))


class MaskDecoder(nn.Module):
    """Pixel decoder + agent refinement of every level + Mask2Former transformer decoder.

    stages (4 maps), agent queries q [B, r, d] -> per prediction step (1 + layers of them):
    class logits [B, r, K+1] and mask logits [B, r, H/4, W/4].
    """

    def __init__(self, stage_channels: Sequence[int], num_classes: int, dim: int, heads: int, layers: int, ffn: int):
        super().__init__()
        self.pixel = PixelDecoder(stage_channels, dim)
        self.refine = AgentRefinement(dim, dim, heads)
        self.query_feat = nn.Linear(dim, dim)
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.layers = nn.ModuleList([DecoderLayer(dim, heads, ffn) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, stages: Sequence[Tensor], queries: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        mask_feat, memories = self.pixel(stages)
        mask_feat = self.refine(mask_feat, queries)
        memories = [self.refine(m, queries) for m in memories]
        tokens = [m.flatten(2).transpose(1, 2) + self.level_embed[i] for i, m in enumerate(memories)]
        token_pos = [sine_position(*m.shape[-2:], m.shape[1], m) for m in memories]
        q, pos = self.query_feat(queries), queries
        cls, masks, attn = self._predict(q, mask_feat, memories[0].shape[-2:])
        all_cls, all_masks = [cls], [masks]
        for i, layer in enumerate(self.layers):
            level = i % len(memories)
            q = layer(q, pos, tokens[level], token_pos[level], attn)
            cls, masks, attn = self._predict(q, mask_feat, memories[(i + 1) % len(memories)].shape[-2:])
            all_cls.append(cls)
            all_masks.append(masks)
        return all_cls, all_masks

    def _predict(self, q: Tensor, mask_feat: Tensor, attn_size) -> tuple[Tensor, Tensor, Tensor]:
        qn = self.norm(q)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_head(qn), mask_feat)
        attn = F.interpolate(masks.detach(), size=attn_size, mode="bilinear", align_corners=False).flatten(2) < 0  # σ < 0.5
        attn = attn & ~attn.all(dim=-1, keepdim=True)  # a query that masks everything attends everywhere
        return self.class_head(qn), masks, attn


class DiffusionGuidance(nn.Module):
    """Frozen U-Net features -> the agent-query space, and the DCL on them (training only).

    weak / strong: lists of [B, C_l, h_l, w_l] (one per tapped layer) at t_w / t_s. Weak: a
    learned 1×1 conv per layer (P_w); strong: a frozen random projection per layer (P_s, a
    seeded buffer), standardised per channel over space. Both summed over layers on the finest
    grid -> `diffusion_consistency_loss(q, F_w, F_s)` = (L_dist, L_sup).
    """

    def __init__(self, channels: Sequence[int], dim: int, seed: int = 0):
        super().__init__()
        self.weak = nn.ModuleList([nn.Conv2d(c, dim, 1) for c in channels])
        g = torch.Generator().manual_seed(seed)
        for i, c in enumerate(channels):
            self.register_buffer(f"strong_{i}", torch.randn(dim, c, generator=g) / math.sqrt(c))

    def forward(self, queries: Tensor, weak: Sequence[Tensor], strong: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        size = max((f.shape[-2:] for f in weak), key=lambda s: s[0] * s[1])
        resize = lambda x: x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        f_w = sum(resize(conv(f.to(queries.dtype))) for conv, f in zip(self.weak, weak))
        f_s = sum(resize(torch.einsum("dc,bchw->bdhw", getattr(self, f"strong_{i}").to(queries.dtype), f.to(queries.dtype))) for i, f in enumerate(strong))
        f_s = (f_s - f_s.mean((2, 3), keepdim=True)) / (f_s.std((2, 3), keepdim=True) + 1e-6)
        return diffusion_consistency_loss(queries, f_w, f_s)


class QueryDiff(nn.Module):
    """backbone -> agent queries -> refined Mask2Former decoder; `guidance` (training only) is
    called when diffusion features are given. Returns (class logits per step, mask logits per
    step, (L_dist, L_sup) or None)."""

    def __init__(self, backbone: nn.Module, num_classes: int, dim: int, queries: int, heads: int, layers: int, ffn: int,
                 guidance: Optional[DiffusionGuidance] = None):  # fmt: skip
        super().__init__()
        self.backbone = backbone
        self.agents = AgentQueries(backbone.channels, queries, dim, heads)
        self.decoder = MaskDecoder(backbone.channels, num_classes, dim, heads, layers, ffn)
        self.guidance = guidance

    def forward(self, images: Tensor, weak: Optional[Sequence[Tensor]] = None, strong: Optional[Sequence[Tensor]] = None):
        stages = self.backbone(images)
        q = self.agents(stages)
        cls, masks = self.decoder(stages, q)
        dcl = self.guidance(q, weak, strong) if weak is not None else None
        return cls, masks, dcl


# ---------------------------------------------------------------------------------------------
# Diffusion features, losses, prediction


@torch.no_grad()
def diffusion_features(unet: UNet, vae, context: Tensor, images: Tensor, schedule: NoiseSchedule,
                       timesteps: tuple[int, int] = (T_WEAK, T_STRONG)) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """images [B, 3, H, W] -> (weak, strong): the `TAPS` features at t_w and t_s, from ONE U-Net
    forward over the 2B noised latents (`timestep_features`), each a list of [B, C_l, h_l, w_l]."""
    z = vae.encode(images).to(next(unet.parameters()).dtype)  # posterior mean (the release's choice)
    feats = timestep_features(unet, z, list(timesteps), context.to(z.dtype), TAPS, schedule=schedule)
    return [feats[n][:, 0] for n in TAPS], [feats[n][:, 1] for n in TAPS]


def point_targets(labels: Tensor, grid: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """labels [B, H, W], grid [B, 1, P, 2] in [-1, 1] -> per image (classes [T], masks at the
    points [T, P]) for the T classes present (ignore excluded; its pixels are 0 in every mask)."""
    classes, masks = [], []
    for lab, g in zip(labels, grid):
        present = lab.unique()
        present = present[present != IGNORE]
        m = (lab[None] == present[:, None, None]).float()
        pts = F.grid_sample(m[None], g[None], mode="nearest", align_corners=False)[0, :, 0] if len(present) else m.new_zeros(0, g.shape[1])
        classes.append(present)
        masks.append(pts)
    return classes, masks


def mask_classification_loss(all_cls: Sequence[Tensor], all_masks: Sequence[Tensor], labels: Tensor, num_classes: int, points: int) -> Tensor:
    """Mask2Former's set loss summed over the prediction steps (deep supervision).

    Per step and image: Hungarian matching of the present classes to the r queries with cost
    2·(−p_c) + 5·BCE + 5·Dice on `points` uniformly drawn points; then 2·CE over all queries
    (unmatched -> no-object, weight 0.1) + 5·BCE + 5·Dice over the matched masks.
    """
    b, w = labels.shape[0], LOSS_WEIGHTS
    grid = torch.rand(b, 1, points, 2, device=labels.device) * 2 - 1
    tgt_classes, tgt_masks = point_targets(labels, grid)
    class_weight = torch.ones(num_classes + 1, device=labels.device)
    class_weight[-1] = w["no_object"]
    total = labels.new_zeros((), dtype=torch.float32)
    for cls, masks in zip(all_cls, all_masks):
        cls, pts = cls.float(), F.grid_sample(masks.float(), grid, align_corners=False)[:, :, 0]  # [B, r, P]
        target_cls = torch.full(cls.shape[:2], num_classes, dtype=torch.long, device=cls.device)
        pred_m, tgt_m = [], []
        for i in range(b):
            if len(tgt_classes[i]) == 0:
                continue
            x, t = pts[i], tgt_masks[i]
            with torch.no_grad():
                cost_cls = -cls[i].softmax(-1)[:, tgt_classes[i]]
                cost_bce = (F.softplus(-x) @ t.T + F.softplus(x) @ (1 - t).T) / x.shape[1]
                s = x.sigmoid()
                cost_dice = 1 - (2 * s @ t.T + 1) / (s.sum(-1)[:, None] + t.sum(-1)[None] + 1)
                cost = w["cls"] * cost_cls + w["bce"] * cost_bce + w["dice"] * cost_dice  # [r, T]
            q_idx, t_idx = linear_sum_assignment(cost)
            q_idx, t_idx = q_idx.to(cls.device), t_idx.to(cls.device)
            target_cls[i, q_idx] = tgt_classes[i][t_idx]
            pred_m.append(x[q_idx])
            tgt_m.append(t[t_idx])
        total = total + w["cls"] * F.cross_entropy(cls.transpose(1, 2), target_cls, weight=class_weight)
        if pred_m:
            x, t = torch.cat(pred_m), torch.cat(tgt_m)
            total = total + w["bce"] * F.binary_cross_entropy_with_logits(x, t) + w["dice"] * dice_loss(x, t)
    return total


def semantic_scores(cls: Tensor, masks: Tensor) -> Tensor:
    """Mask2Former semantic inference: Σ_q softmax(p_q)[:K] · σ(m_q) -> [B, K, h, w]."""
    return torch.einsum("bqk,bqhw->bkhw", cls.float().softmax(-1)[..., :-1], masks.float().sigmoid())


def predict_scores(model: nn.Module, images: Tensor) -> Tensor:
    """Inference WITHOUT the diffusion branch: images [N, 3, h, w] -> class scores [N, K, h/4, w/4]."""
    with torch.no_grad(), autocast(images.device):
        cls, masks, _ = model(images)
    return semantic_scores(cls[-1], masks[-1])


def train_step(forward, model: QueryDiff, opt, images: Tensor, labels: Tensor, num_classes: int, points: int,
               dcl_weight: float, teacher=None) -> dict:  # fmt: skip
    """One optimiser step. `forward`: the model as called (DDP / compiled); `teacher`:
    (unet, vae, context, schedule, (t_w, t_s)) when dcl_weight > 0. Returns the (detached) losses."""
    weak = strong = None
    if dcl_weight > 0:
        with autocast(images.device):
            unet, vae, context, schedule, timesteps = teacher
            weak, strong = diffusion_features(unet, vae, context, images, schedule, timesteps)
    with autocast(images.device):
        cls, masks, dcl = forward(images, weak, strong)
    seg = mask_classification_loss(cls, masks, labels, num_classes, points)
    loss = seg
    if dcl is not None:
        loss = loss + dcl_weight * (dcl[0].float() + dcl[1].float())
    check_finite_everywhere(loss, "QueryDiff loss")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    out = {"seg": seg.detach()}
    if dcl is not None:
        out.update(dist=dcl[0].detach(), sup=dcl[1].detach())
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data, num_classes: int, device, slide: bool):
    """This rank's share of `data` -> (all-rank confusion [K, K], up to 4 (image, pred, label)),
    in eval mode without the diffusion branch; restores the training mode."""
    was_training = model.training
    model.eval()
    if slide:
        predict = lambda x: slide_logits(lambda w: predict_scores(model, w), x, CROP, STRIDE, num_classes)  # noqa: E731
    else:
        predict = lambda x: predict_scores(model, x)  # noqa: E731
    out = evaluate_semantic(predict, data, num_classes, device, batch_size=1 if slide else 16)
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# Assembly, training, evaluation


def build_model(args, num_classes: int, guided: bool, teacher_channels: Sequence[int]) -> QueryDiff:
    torch.manual_seed(args.seed)  # the same initial weights with and without DCL
    if args.demo:
        backbone = ConvBackbone()
    elif args.backbone == "dinov2":
        backbone = ReinDINOv2(pretrained=not args.no_pretrained, img_size=args.size)
    else:
        backbone = TimmCNN(args.backbone, pretrained=not args.no_pretrained)
    guidance = DiffusionGuidance(teacher_channels, args.dim, args.seed) if guided else None
    return QueryDiff(backbone, num_classes, args.dim, args.queries, args.heads, args.decoder_layers, args.ffn, guidance)


def tap_channels(unet_channels: Sequence[int]) -> list[int]:
    """Channels of `TAPS` (`up.i.res.j` has the width of level n−1−i)."""
    return [unet_channels[len(unet_channels) - 1 - int(name.split(".")[1])] for name in TAPS]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases, scalars, learnable tokens, embeddings (release config)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim <= 1 or any(k in name for k in ("tokens_", "q_init", "level_embed", "norm"))
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_teacher(args, device):
    """(unet, vae, context, schedule): frozen SD (real) or the demo's tiny random U-Net,
    block codec and tiny text encoder. Only called for training with DCL."""
    if args.demo:
        torch.manual_seed(args.seed + 1)
        unet, vae = UNet(DEMO_TEACHER), BlockCodec()
        text_encoder, tokenizer = CLIPTextEncoder(TINY_SD2_TEXT), CLIPTokenizer.from_bpe(pad_token="!")
        schedule = NoiseSchedule.sd()
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        sd = load_sd(args.model, dtype=dtype)
        unet, vae, text_encoder, tokenizer, schedule = sd.unet, sd.vae, sd.text_encoder, sd.tokenizer, sd.schedule
    unet.to(device).eval().requires_grad_(False)
    vae.to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    with torch.no_grad():
        context = text_encoder.to(device).eval()(tokenizer([""]).to(device))
    if args.demo and args.teacher_steps:
        empty_prompt = lambda labels: context.expand(len(labels), -1, -1)  # noqa: E731
        loss = pretrain_denoiser(unet, vae, schedule, args.teacher_steps, args.size, args.seed, empty_prompt, batch_size=16, device=device)
        print0(f"demo teacher: tiny U-Net pre-trained for {args.teacher_steps} denoising steps on random looks (loss {loss:.3f})")
    return unet, vae, context, schedule.to(device), (args.t_weak, args.t_strong)




def datasets(args):
    """(train set, {name: test set}, class names, slide-window evaluation?)."""
    if args.demo:
        scenes = lambda seed, n, style: ContiguousLabels(SemanticScenes(seed, n, args.size, DEMO_CLASSES, style=style), DEMO_CLASSES)  # noqa: E731
        train = scenes(args.seed, 100_000, CLEAN_STYLE)
        tests = {"hazy (held-out)": scenes(args.seed + 1, args.eval_images, HAZY_STYLE),
                 "clean (source)": scenes(args.seed + 1, args.eval_images, CLEAN_STYLE)}  # fmt: skip
        return train, tests, ("background",) + tuple(CLASS_NAMES[c] for c in DEMO_CLASSES), False
    from unet_seg.data.driving import CITYSCAPES_CLASSES, LAYOUTS, DrivingScenes
    from unet_seg.data.transforms import RandomResizeCropFlip, ResizeImage

    crop = RandomResizeCropFlip((args.size, args.size), (2048, args.size), (0.5, 2.0))  # short side 256..1024 at 512
    train = DrivingScenes("gta5", args.gta_root, "train", transform=crop, seed=args.seed) if args.gta_root else None
    roots = {"cityscapes": args.cityscapes_root, "bdd100k": args.bdd_root, "mapillary": args.mapillary_root}
    tests = {n: DrivingScenes(n, r, "val", transform=ResizeImage(LAYOUTS[n].scale)) for n, r in roots.items() if r}
    if args.eval_images:
        tests = {n: torch.utils.data.Subset(d, range(min(args.eval_images, len(d)))) for n, d in tests.items()}
    return train, tests, CITYSCAPES_CLASSES, True


class ContiguousLabels(torch.utils.data.Dataset):
    """Demo: synthetic scenes of `classes` with their ids renumbered 1..len(classes) (0 background)."""

    def __init__(self, scenes: SemanticScenes, classes: Sequence[int]):
        self.scenes = scenes
        self.lookup = torch.full((256,), IGNORE, dtype=torch.long)
        self.lookup[0] = 0
        self.lookup[torch.tensor(classes)] = torch.arange(1, len(classes) + 1)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image, label = self.scenes[i]
        return image, self.lookup[label]


def fields(batch) -> tuple[Tensor, Tensor]:
    return (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])


def train(args, model: QueryDiff, out: Path, dcl_weight: float, teacher, train_data, num_classes: int, device, desc: str) -> float:
    """Train `model` in place for args.steps (resuming from `out` with --resume); returns seconds."""
    started = time.perf_counter()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=args.steps, power=0.9)
    step, models = 0, {"model": model}
    if args.resume and latest_checkpoint(out) is not None:
        step = load_checkpoint(latest_checkpoint(out), models, opt, sched).step
        print0(f"{desc}: resumed from step {step}")
    local = device.index if device.type == "cuda" else None
    wrapped = DDP(model, device_ids=[local] if local is not None else None) if world > 1 else model
    forward = maybe_compile(wrapped, args.compile)
    loader = resumable_loader(train_data, args.batch_size, args.seed, num_workers=0 if args.demo else 4)
    steps_per_epoch = len(loader)
    bar = progress(total=args.steps, initial=step, desc=desc)
    while step < args.steps:
        epoch, offset = divmod(step, steps_per_epoch)
        loader.sampler.set_epoch(epoch, start=offset * args.batch_size)
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(epoch)
        for batch in loader:
            images, labels = (x.to(device) for x in fields(batch))
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            losses = train_step(forward, model, opt, images, labels, num_classes, args.points, dcl_weight, teacher)
            sched.step()
            step += 1
            bar.update()
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
            if step % args.save_every == 0 or step == args.steps:
                save_checkpoint(out, step, models, opt, sched, epoch, extra={"args": str(vars(args)), "dcl_weight": dcl_weight}, keep_last=2)
            if step == args.steps:
                break
    bar.close()
    return time.perf_counter() - started


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    rank, world, _, device = init_distributed()
    if args.demo:
        print0(
            "DEMO: small conv backbone; teacher: a tiny SD2-structured U-Net pre-trained here as a denoiser on random "
            "looks, a frozen 8x8 block codec in place of SD's VAE; synthetic scenes (train CLEAN, test HAZY), "
            f"{device.type.upper()}, no download "
            "(real runs: --model <SD 2.x> --gta-root ... with the `recipes` extra for timm)"
        )
    seed_everything(args.seed, rank)
    args.out.mkdir(parents=True, exist_ok=True)
    train_data, tests, class_names, slide = datasets(args)
    num_classes = len(class_names)

    runs = [("QueryDiff", args.dcl_weight)] + ([("no DCL", 0.0)] if args.compare else [])
    teacher_channels = tap_channels(DEMO_TEACHER.channels if args.demo else (320, 640, 1280, 1280))  # SD 1.x/2.x widths
    teacher = None
    if not args.eval_only and any(w > 0 for _, w in runs):
        teacher = build_teacher(args, device)
    metrics, shown = {}, {}
    for name, weight in runs:
        out = args.out / ("querydiff" if weight > 0 else "no_dcl")
        model = build_model(args, num_classes, weight > 0, teacher_channels)
        if args.eval_only:
            ckpt = latest_checkpoint(out)
            if ckpt is None:
                raise FileNotFoundError(f"--eval-only: no checkpoint in {out}")
            load_checkpoint(ckpt, {"model": model})
            model.to(device)
            seconds = 0.0
        else:
            seed_everything(args.seed, rank)  # both runs see the same noise, points and data order
            seconds = train(args, model, out, weight, teacher, train_data, num_classes, device, name)
        evaluated = maybe_compile(model, args.compile) if args.compile else model
        row = {}
        t0 = time.perf_counter()
        images = 0
        for test_name, data in tests.items():
            conf, keep = evaluate(evaluated, data, num_classes, device, slide)
            row[f"{test_name} mIoU"] = round(100 * iou_per_class(conf).nanmean().item(), 2)
            images += len(data)
            if test_name == next(iter(tests)):
                shown[name] = keep
                print0(f"{name}, {test_name}:\n" + iou_table(conf, class_names))
        eval_seconds = time.perf_counter() - t0
        row["train s"] = round(seconds, 1)
        row["eval img/s"] = round(images / max(eval_seconds, 1e-9), 1)
        metrics[name] = row
    if args.demo:  # the trivial baseline: the scenes are mostly background
        background = lambda x: x.new_zeros((x.shape[0], *x.shape[2:]), dtype=torch.long)  # noqa: E731
        metrics["baseline: background everywhere"] = {
            f"{n} mIoU": round(100 * iou_per_class(evaluate_semantic(background, d, num_classes, device)[0]).nanmean().item(), 2)
            for n, d in tests.items()
        }
    wall = time.perf_counter() - started

    title = "QueryDiff " + ("(DEMO: synthetic CLEAN -> HAZY)" if args.demo else "GTA5 -> " + ", ".join(tests))
    table = write_metrics(metrics, args.out / "metrics", title=title)
    if rank == 0 and shown:
        names = list(shown)
        rows = []
        for i in range(len(shown[names[0]])):
            image, _, label = shown[names[0]][i]
            rows.append([image_to_uint8(image)] + [overlay(image, shown[n][i][1]) for n in names] + [overlay(image, label)])
        save_grid(rows, args.out / "predictions.png", titles=[next(iter(tests))] + names + ["ground truth"], scale=3 if args.demo else 1)
    print0("\n" + table)
    print0(f"total {wall:.0f} s on {world} process(es); wrote {args.out}/metrics.md, .json, predictions.png")
    barrier()
    cleanup_distributed()
    return metrics


if __name__ == "__main__":
    main()
