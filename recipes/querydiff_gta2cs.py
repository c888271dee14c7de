"""QueryDiff domain-generalised segmentation: train on GTA5, evaluate on Cityscapes / BDD100K /
Mapillary; or, with `--demo`, train on synthetic CLEAN scenes and evaluate on the held-out HAZY style.

Li et al., "Better to Teach than to Give: Domain Generalized Semantic Segmentation via Agent
Queries with Diffusion Model Guidance", ICML 2025 (overview ../shared/design/papers/querydiff-blog.txt),
built as the official code FanLiHub/QueryDiff does (digest ../shared/design/fidelity/querydiff-official.md).

    python recipes/querydiff_gta2cs.py --demo                       # CPU, minutes, no download
    python recipes/querydiff_gta2cs.py --model stabilityai/stable-diffusion-2-1 --data-root /data \\
        --targets cityscapes bdd100k mapillary              # /data holds gta5/, cityscapes/, bdd100k/, mapillary/

Method (one training step; the diffusion branch is skipped at inference and never built for it):

    f_1..f_4 = DINOv2 + Rein(x)                        strides 4, 8, 16, 32; Rein tokens T [24, r, 1024]
    q        = ProgressiveMerge(T)                     [r, 1024], image-independent (24 -> 12 -> 6 -> 3, mean, MLP)
    q₂₅₆     = Linear(q)                               decoder width
    F, m     = MSDeformAttnPixelDecoder(f)             mask features (stride 4), memories (32, 16, 8)
    F, m     = QueryRefinement(F, m, q₂₅₆)             pixels attend to the agents, 4 dilated separable convs
    (c, M)_i = MaskedAttentionDecoder(F, m, Linear(q₂₅₆), pos = q₂₅₆)     10 predictions
    -- diffusion guidance (training only, frozen SD) --
    F_w, F_s = DiffusionTokens(U-Net up-block ResNet branches at t_w = 0, t_s = 100)   [B, r, 1024]
    S        = softmax_M(mlp_feat(q) mlp_diff_w(F_w)ᵀ / √1024)
    L_dist   = KL(softmax_C F_s ‖ softmax_C mlp_diff_new(S q));   L_sup = SmoothL1(q, sg(S F_w))
    L        = Σ_i set_loss((c, M)_i) + L_dist + L_sup

| setting | blog / paper | official code | here |
|---|---|---|---|
| backbone | DINOv2 (also ResNet, MiT) | DINOv2-L/16 frozen + LoRA Rein (r 16, 100 tokens), blocks 7/11/15/23 ×4/×2/×1/×½; /14 kernel and position embedding resized bicubically (`convert_dinov2`) | same (`backbones.release_patch16`; DINOv2 in plain PyTorch, timm's hub weights, `--dinov2`); `--patch-resize pinv`: timm's FlexiViT resize |
| agent queries | q_init attend each backbone stage, progressive merge | `PMerge` over Rein's tokens: 24→12→6→3 groups (cross-attn, embed 512), mean, MLP; 1024-d | same, trained (¹) |
| queries to head | Linear, positions | `querys2feat` Linear(256, 256), `query_pos` = agents; 256-d | Linear(1024 → 256) first (²) |
| pixel decoder | Mask2Former | mmdet MSDeformAttn: 6 layers, 3 levels, 256, 8 heads, 4 points | same (`unet_seg.mask2former`) |
| refinement | cross-attention with the queries | pixels → agents MHA, no residual; 4 dilated (1-4) depth-wise separable convs | same |
| decoder | Mask2Former | 9 layers, 100 queries, 256, 8 heads, FFN 2048 | same |
| diffusion model | SD 1.4/1.5/2.1 similar | local "stable-diffusion-2" (ε), empty prompt unpadded (2 tokens), VAE mean of raw RGB (⁵), fp32 | SD 2.1 (`--model`), same; bf16 on GPU |
| precision | — | fp32 (no AMP in the config) | model fp32; `--amp`: bf16 autocast (faster) |
| diffusion features | t_w, t_s (no values) | t = 0 and 100; up-blocks 1-3 ResNet branches; taps dead as released (³) | same taps, one batched U-Net call |
| diffusion tokens | — | [B, M, 1024], construction not in the code (³) | pooled to √r × √r, frozen random projection (³) |
| DCL | S, KL, L_sup | 3 single Linears; KL over channels, batchmean; SmoothL1 to S·F_w (weak); weights 1, 1 | same, M = r (³) |
| set loss | CE + Dice | CE 2 (no-object 0.1), BCE 5, Dice 5; 12544 points, importance 0.75, oversample 3 | same (`mask2former.set_loss`) |
| optimiser | AdamW, lr 1e-5 backbone, 1e-4 decoder and queries | AdamW 1e-4 for all, wd 0.05 (none on norms, tokens, the decoder's level embedding; the pixel decoder's is decayed) | paper's lrs (`--schedule release`: one lr) |
| schedule | 60 000 iterations, batch 4 | poly 0.9, 40 000 iterations, batch 2, no warm-up | paper's (`--schedule release`: config's) |
| training data | GTA5, crop 512 | short side 256..1024 step 51 (long ≤ 2048), crop 512 (cat 0.75), flip, PhotoMetricDistortion, pad 0 after normalising (ImageNet mean); RCS named, not implemented | same, no RCS |
| evaluation | CS, BDD100K, MV mIoU | slide 512 / 341 (1024 / 683 in the 1024 configs); CS (1024, 512), BDD (1280, 720), MV halved offline (PIL bicubic, JPEG re-saved) then (1024, 512) | same, window `--size` / ⅔ `--size`, mask logits upsampled before σ as mmseg (MV halved on the fly, no JPEG re-encoding) |
| reported | CS 69.1, MV 68.6 (r = 100), average 66.7 | — | not run here (no weights, no GPU time) |

Notes. (¹) The release freezes PMerge and the DCL Linears by accident (`set_requires_grad(["reins"])`
turns off every non-Rein backbone parameter) and leaves them out of checkpoints; here they train.
(²) PMerge emits 1024-d queries but every consumer in the head is 256-d; the bridge is not in
the release. Rein's own `transform` Linear(1024, 256) (created, never called) is used. (³) As
released the U-Net taps return nothing (wrong mode strings) and the DCL lines only type-check
with M = N tokens and 1024-d queries (`S @ q`, KL of [B, N, ·] against [B, M, ·]): we take that
reading (`mlp_feat` 1024 → 1024, scale 1/√1024) and make M = r tokens by average-pooling the
nine maps to a √r × √r grid and projecting each to 1024 with a frozen random matrix (training
cannot move the KL target), then averaging. The blog's reading is `unet_seg.attention`'s
AgentQueries / AgentRefinement and `losses.diffusion_consistency_loss`, not wired here.
(⁴) `--demo` cannot download: `ReinConvNet` (a small CNN with Rein tokens after each of its 4
stages, trained in full) instead of DINOv2, d = 64, 2 encoder and 3 decoder layers, 16 agent
queries, 64² images of 5 synthetic classes; the teacher is a tiny SD2-structured U-Net with the
frozen `BlockCodec` as its VAE: the package's pre-trained demo SD (`--random-demo-model`: a
random one pre-trained here as a denoiser). Control: the same model without the diffusion branch.
Measured (300 steps, 100 hazy images, seeds 0 / 1, one CPU thread): 25.45 / 22.56 mIoU with DCL,
22.88 / 23.66 without, background everywhere 13.35 / 13.22 (earlier, random-start teacher: 24.41 /
23.74 with DCL, 24.12 / 25.17 without): no clear DCL gain. (⁵) The release feeds its VAE x/255·2−1 of the normalised input.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from unet_seg.cli import parse_recipe_args, recipe_parser, run

T_WEAK, T_STRONG = 0, 100  # official feature_extraction(x, 0) and (x, 100)
SCHEDULES = {"paper": dict(steps=60000, batch_size=4, backbone_lr_mult=0.1), "release": dict(steps=40000, batch_size=2, backbone_lr_mult=1.0)}
DEMO = dict(size=64, steps=300, batch_size=8, lr=1e-3, dim=64, heads=4, pixel_layers=2, decoder_layers=3, ffn=128, merge_dim=64, queries=16, points=1024, eval_items=100, teacher_steps=200)
REAL = dict(size=512, steps=60000, batch_size=4, lr=1e-4, dim=256, heads=8, pixel_layers=6, decoder_layers=9, ffn=2048, merge_dim=512, queries=100, points=12544, eval_items=0, teacher_steps=0)


def slide_window(size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(crop, stride) of the evaluation windows for training crops of `size`: the release's test_cfg,
    512 / 341 and (its 1024 configs) 1024 / 683, i.e. stride = 2/3 of the crop."""
    return (size, size), (round(2 * size / 3),) * 2


def parse_args(argv=None) -> argparse.Namespace:
    p = recipe_parser(
        "QueryDiff: domain-generalised segmentation with agent queries taught by a frozen diffusion model during "
        "training only (--model is loaded for training alone). --demo runs on CPU with tiny models and "
        "synthetic data (train CLEAN, test HAZY), and also trains the same model without DCL.",
        DEMO, REAL, out="runs/querydiff", eval_items="test images per target domain", size_multiple=(64, "QueryDiff's backbones and pixel decoder run at multiples of 64 only"),
    )  # fmt: skip
    p.add_argument("--schedule", default="paper", choices=tuple(SCHEDULES), help="paper: 60k iterations, batch 4, backbone (Rein) lr x0.1; release: the config's 40k, batch 2, one lr")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (tests, benchmarks)")
    p.add_argument("--dinov2", help="DINOv2 weights: a timm hub repo id or a local folder in its layout (config.json, model.safetensors); default timm's ViT-L/14 (lvd142m)")
    p.add_argument("--patch-resize", default="bicubic", choices=("bicubic", "pinv"), help="DINOv2 /14 -> /16: the release's bicubic kernel resize, or timm's pseudo-inverse (FlexiViT)")
    p.add_argument("--data-root", help="folder holding gta5/ (trained on), cityscapes/, bdd100k/, mapillary/ (see unet_seg.data.driving)")
    p.add_argument("--targets", nargs="+", default=["cityscapes", "bdd100k", "mapillary"], choices=("cityscapes", "bdd100k", "mapillary"),
                   help="unseen test domains (val splits; Mapillary at half resolution)")  # fmt: skip
    p.add_argument("--small-head", action="store_true", help="the demo's decoder sizes (width 64, 4 heads, 2 pixel-decoder and 3 decoder layers, FFN 128, merge 64) instead of the release's (tests, smoke runs)")
    p.add_argument("--dcl-weight", type=float, default=1.0, help="weight of L_dist + L_sup (0: no diffusion branch)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast over the segmentation model on a GPU (faster; the release trains in fp32)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, help="replay each training step (diffusion features, "
                   "model forward, set loss with its matching, backward, optimiser) as one CUDA graph: the host no longer paces "
                   "the GPU; default: on where the run has one GPU (several: opt in)")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, help="also train the model without DCL (default: on with --demo)")
    p.add_argument("--t-weak", type=int, default=T_WEAK, help="weak-noise timestep t_w (of 1000)")
    p.add_argument("--t-strong", type=int, default=T_STRONG, help="strong-noise timestep t_s (of 1000)")
    p.add_argument("--queries", type=int, help="agent queries r = Rein tokens = decoder queries (100; demo 16)")
    p.add_argument("--teacher-steps", type=int, help="with --demo --random-demo-model: denoising pre-training steps of the tiny random U-Net teacher (200)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the latest checkpoints in --out (SD is never loaded)")
    schedule = SCHEDULES[p.parse_known_args(argv)[0].schedule]
    args = parse_recipe_args(p, argv, DEMO, {**REAL, "steps": schedule["steps"], "batch_size": schedule["batch_size"]}, dataset="GTA5")
    if args.predict:
        return args
    if args.small_head:
        vars(args).update({k: DEMO[k] for k in ("dim", "heads", "pixel_layers", "decoder_layers", "ffn", "merge_dim")})
    args.backbone_lr_mult = 1.0 if args.demo else schedule["backbone_lr_mult"]
    args.compare = args.demo if args.compare is None else args.compare
    args.window = slide_window(args.size)  # evaluation windows follow the training crop
    if args.queries < 1:
        p.error(f"--queries must be >= 1, got {args.queries}")
    if args.dcl_weight < 0:
        p.error(f"--dcl-weight must be >= 0, got {args.dcl_weight}")
    return args


if __name__ == "__main__":
    parse_args()  # usage errors here, before the seconds that importing torch takes
import torch
from torch import Tensor, nn

from unet_seg import load_sd
from unet_seg.backbones import DINOV2_HUB, ReinConvNet, ReinDINOv2
from unet_seg.data.synthetic import CLASS_NAMES, CLEAN_STYLE, HAZY_STYLE, SemanticScenes, fold_split
from unet_seg.demo import demo_sd, pretrain_denoiser
from unet_seg.diffusion import NoiseSchedule
from unet_seg.mask2former import MaskedAttentionDecoder, MSDeformAttnPixelDecoder, SetLossConfig, check_class_ids, semantic_scores, semantic_targets, set_loss
from unet_seg.metrics import iou_per_class, iou_table
from unet_seg.predict import Predictor, default_device, load_checkpoint_for_export, load_tensors, logits_predictor, predict_files, read_export, save_export, trained_tensors
from unet_seg.models import TINY_SD2, UNet
from unet_seg.querydiff import DiffusionConsistency, DiffusionTokens, ProgressiveMerge, QueryRefinement
from unet_seg.segmentation import evaluate_semantic, slide_logits
from unet_seg.taps import timestep_features
from unet_seg.train import (
    CudaGraphStep, autocast, backward_and_step, check_finite_everywhere, evaluation, finish_run, head, load_latest, maybe_compile, print0,
    progress, resumable_loader, resume_latest, same_init_on_every_rank, sanity_check, save_checkpoint, should_checkpoint, start_run,
    rank_and_world, training_batches, use_cuda_graph, wrap_for_training,
)  # fmt: skip
from unet_seg.viz import image_to_uint8, overlay, save_grid

TAPS = tuple(f"up.{i}.res.{j}.branch" for i in (1, 2, 3) for j in range(3))  # official up_blocks[1..3].resnets[0..2], residual branch
DEMO_TEACHER = replace(TINY_SD2, channels=(32, 64, 64, 64))  # a quarter of TINY_SD2's FLOPs: CPU minutes
DEMO_CLASSES = fold_split(0)[1]  # 5 synthetic classes, one per form: striped disc, checkered ring, ...

# ---------------------------------------------------------------------------------------------
# The model: Rein backbone, agent queries, Mask2Former with refinement, DCL (training only)


class QueryDiff(nn.Module):
    """images -> (class logits per prediction, mask logits per prediction, (L_dist, L_sup) or None);
    the DCL is computed when the frozen U-Net's weak and strong feature maps are passed."""

    def __init__(self, backbone: nn.Module, num_classes: int, args, guided: bool = False, tap_channels: Sequence[int] = ()):
        super().__init__()
        layers, tokens, width = backbone.reins.tokens_a.shape[0], backbone.reins.tokens_a.shape[1], backbone.reins.tokens_b.shape[2]
        d = args.dim
        self.backbone = backbone
        self.merge = ProgressiveMerge(layers, tokens, width, embed_dim=args.merge_dim)
        self.transform = nn.Linear(width, d)  # INFERRED 1024 -> 256 bridge (Rein's `transform`)
        self.pixel_decoder = MSDeformAttnPixelDecoder(backbone.channels, d, d, args.pixel_layers, args.heads)
        self.refine = QueryRefinement(d, args.heads)
        self.query_feat = nn.Linear(d, d)  # the release's `querys2feat`
        self.decoder = MaskedAttentionDecoder(num_classes, d, args.heads, args.decoder_layers, args.ffn)
        self.tokens = DiffusionTokens(tap_channels, width, tokens, args.seed) if tap_channels else None  # no state: rebuilt from the seed
        self.dcl = DiffusionConsistency(width) if guided else None

    def forward(self, images: Tensor, weak: Sequence[Tensor] = (), strong: Sequence[Tensor] = ()):
        stages = self.backbone(images)
        agents = self.merge(self.backbone.reins.tokens()).expand(images.shape[0], -1, -1)  # [B, r, 1024]
        q = self.transform(agents)
        mask_features, memories = self.refine(*self.pixel_decoder(stages), q)
        cls, masks = self.decoder(mask_features, memories, self.query_feat(q), q)
        dcl = self.dcl(agents, self.tokens(weak), self.tokens(strong)) if len(weak) else None
        return cls, masks, dcl


@torch.no_grad()
def diffusion_features(unet: UNet, vae, context: Tensor, images: Tensor, schedule: NoiseSchedule,
                       timesteps: tuple[int, int] = (T_WEAK, T_STRONG)) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """images [B, 3, H, W] in [-1, 1] -> (weak, strong): the `TAPS` maps at t_w and t_s (own noise
    draws each, as released) from ONE U-Net forward over the 2B noised latents."""
    z = vae.encode(images)  # posterior mean (the release's choice)
    feats = timestep_features(unet, z, list(timesteps), context, TAPS, schedule=schedule)
    return [feats[n][:, 0].float() for n in TAPS], [feats[n][:, 1].float() for n in TAPS]


def predict_scores(model: nn.Module, images: Tensor, amp: bool = False) -> Tensor:
    """Inference WITHOUT the diffusion branch: images [N, 3, h, w] -> class scores [N, K, h, w], the
    mask logits upsampled before the sigmoid (mmseg's order); fp32 as released, bf16 with `amp`."""
    with torch.no_grad(), autocast(images.device, enabled=None if amp else False):
        cls, masks, _ = model(images)
    return semantic_scores(cls[-1], masks[-1], images.shape[-2:])


def train_step(forward, opt, images: Tensor, labels: Tensor, num_classes: int, loss_cfg: SetLossConfig, dcl_weight: float, teacher=None,
               amp: bool = False) -> tuple[Tensor, dict]:  # fmt: skip
    """One optimiser step -> (loss, {term: value}), tensors; `teacher` = (unet, vae, context,
    schedule, (t_w, t_s)) when dcl_weight > 0; the model in fp32 as released (the frozen teacher
    in bf16 on a GPU), in bf16 autocast with `amp`. No host sync: a non-finite loss skips the
    update on the device, and the caller reads the loss after the step (`check_finite_everywhere`)."""
    weak = strong = ()
    if dcl_weight > 0:
        with autocast(images.device):
            unet, vae, context, schedule, timesteps = teacher
            weak, strong = diffusion_features(unet, vae, context, images, schedule, timesteps)
    with autocast(images.device, enabled=None if amp else False):
        cls, masks, dcl = forward(images, weak, strong)
    seg = set_loss(cls, masks, *semantic_targets(labels, num_classes), loss_cfg)
    loss = seg if dcl is None else seg + dcl_weight * (dcl[0] + dcl[1])
    backward_and_step(opt, (), loss, max_norm=None)  # no clipping (the release's)
    return loss.detach(), {"seg": seg.detach()} | ({} if dcl is None else {"dist": dcl[0].detach(), "sup": dcl[1].detach()})


@torch.no_grad()
def evaluate(model: nn.Module, data, num_classes: int, device, window=None, amp: bool = False):
    """(all-rank confusion [K, K], up to 4 (image, pred, label)) in eval mode without the diffusion
    branch; `window` = (crop, stride) slides windows over each image, None predicts it whole."""
    with evaluation(model):
        return evaluate_semantic(scores(model, num_classes, window, amp), data, num_classes, device, batch_size=1 if window else 16)


def scores(model: nn.Module, num_classes: int, window=None, amp: bool = False):
    """images [N, 3, h, w] -> class scores [N, K, h, w]: whole, or slid over `window` = (crop, stride)."""
    if window:
        return lambda x: slide_logits(lambda w: predict_scores(model, w, amp), x, *window, num_classes)
    return lambda x: predict_scores(model, x, amp)


def export(model: QueryDiff, args, class_names, palette) -> None:
    """RUN/model: the trained weights but the DCL's (training only), what rebuilds the model (frozen DINOv2: --dinov2's)."""
    config = dict(recipe="querydiff", class_names=list(class_names), resize={"square": args.size} if args.demo else {"scale": (1024, 512)},
                  palette=palette, window=None if args.demo else args.window)  # fmt: skip
    save_export(args.out / "model", config, {k: v for k, v in trained_tensors(model).items() if not k.startswith(("tokens.", "dcl."))}, args=args)


def load_trained(run, device=None) -> Predictor:
    """A trained run (or its model/ folder) -> predictor(image) -> class ids [H, W] at the image's size (no diffusion model)."""
    device, (folder, config, tensors) = default_device(device), read_export(run, "querydiff")
    args, num_classes = argparse.Namespace(**config["args"]), len(config["class_names"])
    model = load_tensors(build_model(args, num_classes, guided=False), tensors, str(folder), partial=not args.demo).to(device).eval()
    return logits_predictor(scores(model, num_classes, config["window"], args.amp), config, {"model": model}, device, untinted=0 if args.demo else None)


# ---------------------------------------------------------------------------------------------
# Assembly, data, training


def build_model(args, num_classes: int, guided: bool, unet: Optional[UNet] = None) -> QueryDiff:
    """QueryDiff with the DCL's layers if `guided`; its diffusion tokens (no weights) need the
    teacher `unet`'s tap widths, so only training passes it."""
    with same_init_on_every_rank(args.seed):  # the same weights with and without DCL; then the same noise, points and data order
        if args.demo:
            backbone = ReinConvNet(width=64, tokens=args.queries)
        else:
            backbone = ReinDINOv2(None if args.no_pretrained else getattr(args, "dinov2", None) or DINOV2_HUB, args.size, args.queries, patch_resize=args.patch_resize)
        return QueryDiff(backbone, num_classes, args, guided, tap_channels(unet) if guided and unet is not None else ())


def tap_channels(unet: UNet) -> list[int]:
    """Channels of `TAPS` in `unet` (SD: 1280 ×3, 640 ×3, 320 ×3)."""
    return [unet.feature_info(name).channels for name in TAPS]


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float, weight_decay: float = 0.05) -> list[dict]:
    """AdamW groups: no decay on norm layers, Rein tokens and scale, the decoder's level embedding
    (release config; its pixel decoder's is `level_encoding`, which the "level_embed" key misses:
    decayed); the backbone's trainable part (Rein) at lr × backbone_lr_mult."""
    norms = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)) for p in m.parameters()}
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = id(p) in norms or (any(k in name for k in ("tokens_", "reins.scale", "level_embed")) and not name.startswith("pixel_decoder."))
        key = (lr * (backbone_lr_mult if name.startswith("backbone.") else 1.0), 0.0 if plain else weight_decay)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr": lr_, "weight_decay": wd} for (lr_, wd), ps in groups.items()]


def build_teacher(args, device):
    """(unet, vae, context, schedule, (t_w, t_s)): frozen SD, or the demo's tiny U-Net,
    block codec and tiny text encoder. Only called for training with DCL."""
    with same_init_on_every_rank(args.seed + 1):  # a teacher unlike the student's initialisation
        sd = demo_sd(args.random_demo_model, DEMO_TEACHER) if args.demo else load_sd(args.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    unet, vae, schedule = sd.unet, sd.vae, sd.schedule
    for frozen in (unet, vae):
        frozen.to(device).eval().requires_grad_(False)
    with torch.no_grad():
        context = sd.text_encoder.to(device).eval()(sd.tokenizer([""])[:, :2].to(device))  # BOS, EOS: the release's unpadded prompt
    if args.demo and args.random_demo_model and args.teacher_steps:
        empty_prompt = lambda labels: context.expand(len(labels), -1, -1)  # noqa: E731
        loss = pretrain_denoiser(unet, vae, schedule, args.teacher_steps, args.size, args.seed, empty_prompt, batch_size=16, device=device)
        print0(f"demo teacher: tiny U-Net pre-trained for {args.teacher_steps} denoising steps on random looks (loss {loss:.3f})")
    return unet, vae, context, schedule.to(device), (args.t_weak, args.t_strong)


def datasets(args):
    """(train set, {name: test set}, class names, slide-window evaluation?, palette: None = viz's)."""
    if args.demo:
        scenes = lambda seed, n, style: ContiguousLabels(SemanticScenes(seed, n, args.size, DEMO_CLASSES, style=style), DEMO_CLASSES)  # noqa: E731
        tests = {"hazy (held-out)": scenes(args.seed + 1, args.eval_items, HAZY_STYLE), "clean (source)": scenes(args.seed + 1, args.eval_items, CLEAN_STYLE)}
        return scenes(args.seed, 100_000, CLEAN_STYLE), tests, ("background",) + tuple(CLASS_NAMES[c] for c in DEMO_CLASSES), False, None
    from unet_seg.data.driving import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, LAYOUTS, DrivingScenes
    from unet_seg.data.transforms import IMAGENET_MEAN, Compose, Pad, PhotoMetricDistortion, RandomCrop, RandomFlip, RandomShortEdgeResize, Rescale, ResizeImage, short_edges_for
    side = (args.size,) * 2  # padded last with the ImageNet mean: 0 after the release's normalisation
    crop = Compose((RandomShortEdgeResize(short_edges_for(args.size), 4 * args.size), RandomCrop(side, 0.75, pad=False), RandomFlip(), PhotoMetricDistortion(), Pad(side, IMAGENET_MEAN)))
    root = Path(args.data_root)
    train = None if args.eval_only else DrivingScenes("gta5", root / "gta5", "train", transform=crop, seed=args.seed)
    resize = {n: ResizeImage(LAYOUTS[n].scale) for n in args.targets}
    if "mapillary" in resize:  # scored on halved labels, as the release
        resize["mapillary"] = Compose((Rescale(0.5), resize["mapillary"]))
    tests = {n: DrivingScenes(n, root / n, "val", transform=resize[n]) for n in args.targets}
    if args.eval_items:
        tests = {n: head(d, args.eval_items) for n, d in tests.items()}
    return train, tests, CITYSCAPES_CLASSES, True, CITYSCAPES_PALETTE


class ContiguousLabels(torch.utils.data.Dataset):
    """Demo: synthetic scenes of `classes` with their ids renumbered 1..len(classes) (0 background)."""

    def __init__(self, scenes: SemanticScenes, classes: Sequence[int]):
        self.scenes = scenes
        self.lookup = torch.full((256,), 255, dtype=torch.long)
        self.lookup[0] = 0
        self.lookup[torch.tensor(classes)] = torch.arange(1, len(classes) + 1)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        item = self.scenes[i]
        return {**item, "label": self.lookup[item["label"]]}


def train(args, model: QueryDiff, out: Path, dcl_weight: float, teacher, train_data, tests: dict, slide: bool, num_classes: int, device,
          desc: str, trainings: int = 1) -> float:  # fmt: skip
    """Train `model` in place for args.steps (resuming from `out` with --resume; real runs after a
    sanity check: 2 steps, a checkpoint, one image of every test set); returns seconds."""
    started = time.perf_counter()
    model.to(device).train()
    groups = param_groups(model, args.lr, args.backbone_lr_mult)
    if args.cuda_graph:  # a graph reads the schedule's lr from the GPU
        groups = [{**g, "lr": torch.tensor(g["lr"], device=device)} for g in groups]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=True, capturable=args.cuda_graph)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=args.steps, power=0.9)
    models = {"model": model}
    step = resume_latest(out, models, optimizer=opt, scheduler=sched, steps=args.steps) if args.resume else 0
    forward = wrap_for_training(model, compile=args.compile)
    loader = resumable_loader(train_data, args.batch_size, args.seed, num_workers=args.workers)
    loss_cfg = SetLossConfig(points=args.points)

    train = lambda images, labels: train_step(forward, opt, images, labels, num_classes, loss_cfg, dcl_weight, teacher, args.amp)  # noqa: E731

    def one_step(batch) -> dict:
        check_class_ids(batch["label"], num_classes)  # on the host: a graph's replays check nothing
        loss, losses = train(batch["image"].to(device), batch["label"].to(device))
        check_finite_everywhere(loss, "QueryDiff loss")  # after the step, which a non-finite loss skipped
        sched.step()
        return {k: v.item() for k, v in losses.items()}

    sanity_check(args, out=out, step=step, loader=loader, train=one_step, models=models, optimizer=opt, scheduler=sched,
                 evaluate=lambda data: evaluate(model, data, num_classes, device, args.window if slide else None, args.amp), targets=tests,
                 trainings=trainings)  # fmt: skip
    if args.cuda_graph:  # captured after the sanity check, which reloads the optimiser state a graph would hold
        train = CudaGraphStep(train, [forward], opt)
    bar = progress(total=args.steps, initial=step, desc=desc)
    for step, epoch, batch in training_batches(loader, step, args.steps):
        losses = one_step(batch)
        bar.update()
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        if should_checkpoint(step, args.save_every, args.steps):
            extra = {"args": str(vars(args)), "dcl_weight": dcl_weight}
            save_checkpoint(out, step, models, optimizer=opt, scheduler=sched, epoch=epoch, extra=extra, keep_last=2, final=args.demo and step == args.steps)
    bar.close()
    if args.cuda_graph:
        train.close()  # before the process group goes: a live graph holding NCCL calls hangs destroy_process_group
    return time.perf_counter() - started


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.predict:
        return predict_files(load_trained(args.run), args.predict, args.out)
    job = start_run(
        args,
        demo="small conv backbone with Rein tokens; teacher: a tiny SD2-structured U-Net " + ("pre-trained here as a denoiser on "
        "random looks" if args.random_demo_model else "pre-trained on captioned synthetic scenes") + ", a frozen 8x8 block codec in place of SD's VAE; synthetic scenes (train CLEAN, test HAZY)",
        real="--model <SD 2.x> --data-root ...",
    )
    device = job.device
    # on one GPU, where it is tested equal to the eager step; several GPUs: --cuda-graph (its DDP graph is not measured)
    args.cuda_graph = use_cuda_graph(args.cuda_graph, device, "querydiff_gta2cs.py", default=rank_and_world()[1] == 1)
    train_data, tests, class_names, slide, palette = datasets(args)
    num_classes = len(class_names)
    runs = [("QueryDiff", args.dcl_weight)] + ([("no DCL", 0.0)] if args.compare else [])
    teacher = build_teacher(args, device) if not (args.eval_only or args.export) and any(w > 0 for _, w in runs) else None
    metrics, shown = {}, {}
    for i, (name, weight) in enumerate(runs):
        out = args.out / ("querydiff" if weight > 0 else "no_dcl")
        model = build_model(args, num_classes, weight > 0, teacher[0] if teacher else None)
        if args.export:
            load_checkpoint_for_export(out, args.export, {"model": model})
            return export(model, args, class_names, palette)
        if args.eval_only:
            load_latest(out, {"model": model})
            model.to(device)
            seconds = 0.0
        else:
            seconds = train(args, model, out, weight, teacher, train_data, tests, slide, num_classes, device, name, len(runs) - i)
        if name == runs[0][0]:
            export(model, args, class_names, palette)
        evaluated = maybe_compile(model, args.compile) if args.compile else model
        row, images, t0 = {}, 0, time.perf_counter()
        for test_name, data in tests.items():
            conf, keep = evaluate(evaluated, data, num_classes, device, args.window if slide else None, args.amp)
            row[f"{test_name} mIoU"] = round(100 * iou_per_class(conf).nanmean().item(), 2)
            images += len(data)
            if test_name == next(iter(tests)):
                shown[name] = keep
                print0(iou_table(conf, class_names, title=f"{name}, {test_name}: IoU per class"))
        row["train s"] = round(seconds, 1)
        row["eval img/s"] = round(images / max(time.perf_counter() - t0, 1e-9), 1)
        metrics[name] = row
    if args.demo:  # the trivial baseline: the scenes are mostly background
        background = lambda x: x.new_zeros((x.shape[0], *x.shape[2:]), dtype=torch.long)  # noqa: E731
        metrics["baseline: background everywhere"] = {
            f"{n} mIoU": round(100 * iou_per_class(evaluate_semantic(background, d, num_classes, device)[0]).nanmean().item(), 2) for n, d in tests.items()
        }
    names = list(shown)
    rows = [[image_to_uint8(shown[names[0]][i][0])] + [overlay(shown[names[0]][i][0], shown[n][i][1]) for n in names] + [overlay(shown[names[0]][i][0], shown[names[0]][i][2])]
            for i in range(len(shown[names[0]]))] if names else []  # fmt: skip
    if rows:  # none on a rank whose share of the first test set is empty (rank 0 writes the picture)
        save_grid(rows, args.out / "predictions.png", titles=[next(iter(tests))] + names + ["ground truth"], scale=3 if args.demo else 1)
    title = "QueryDiff " + ("(DEMO: synthetic CLEAN -> HAZY)" if args.demo else "GTA5 -> " + ", ".join(tests))
    return finish_run(job, metrics, out=args.out, title=title, wrote="predictions.png")


if __name__ == "__main__":
    run(main)
