"""DiGSeg semantic segmentation on ADE20K-150 (closed or open vocabulary), or on synthetic scenes
with `--demo`.

Wang et al., "Diffusion Model as a Generalist Segmentation Learner" (DiGSeg; paper text with
appendix: ../shared/design/papers/digseg.txt). No official code was found; every number below
is the paper's unless the table says otherwise.

    python recipes/digseg_ade20k.py --demo                                      # CPU, minutes, no download
    torchrun --nproc_per_node=8 recipes/digseg_ade20k.py \\
        --model stabilityai/stable-diffusion-2-1 --clip openai/clip-vit-large-patch14 \\
        --data-root /data/ADEChallengeData2016

Method (one training sample = an image and one class c; one denoising run per candidate class):

    z_x = E(image),  z_y = E(white-on-black mask of c)                       VAE frozen (§3.4)
    t_c = CLIP_text("A photo of a {c}") / ‖·‖                                CLIP ViT-L/14, cached (A.3)
    ctx = [SD text encoder("") (77 tokens) ; MLP(t_c) (K tokens)]            class tokens seen only by the
                                                                             cross-attention at latent/4, /8
    ε   ~ multi-resolution noise, annealed: w_i(t) = (s·t/T)^i               (A.1; unet_seg.diffusion)
    L   = ‖target − UNet(cat(z_x, √ᾱ_t z_y + √(1−ᾱ_t) ε), t, ctx)‖²           eq. 6, conv_in widened 4 -> 8
    inference: per candidate c, E seeds × S DDIM-trailing steps from z_T ~ N(0, I), mean of the E
    latents (test-time ensembling), decode, p_c = (mean_rgb + 1)/2;
    label = argmax_c p_c, or "background" where max_c p_c < τ = 0.7            (A.3, §4 "τ tuning")
    candidates: all classes, or CLIP: cos(v, t_c) > 0.25 globally, or max over patches
    cos(v_p, t_c) > τ_patch                                                   (A.3)

| hyper-parameter | value | source |
|---|---|---|
| backbone | SD 2.x U-Net; VAE and both text encoders frozen | §4.1 "SDv2", A.2 |
| trained | cross-attention at latent/4 (down.2, up.1), the mid-block transformer, the text MLP, conv_in (note 1) | A.2 |
| image conditioning | channel concat of image and noisy mask latents, conv_in widened 4 -> 8 | §3.4, Fig. 2 |
| mask encoding | one class per sample, white on black, replicated to 3 channels | §3.4 |
| text | CLIP ViT-L/14 text embedding of "A photo of a {class}", L2-normalised, cached | A.3 |
| text MLP | Linear(768, 1024) – GELU – Linear(1024, K·1024), K = 4 tokens (note 2) | A.2 "a small MLP" |
| schedule | DDPM, T = 1000, SD's scaled-linear β; t ~ U{0..T−1} | §4.1 |
| objective | MSE in the checkpoint's parameterisation: v for SD 2.1, ε for 2.1-base (note 3) | eq. 6 |
| training noise | multi-resolution, strength s = 0.9, 10 levels, annealed w_i(t) = (s·t/T)^i | Table 4, A.1 (s: Marigold) |
| absent classes | a class absent from the image (empty mask) with probability 0.25 (note 4) | ours |
| optimiser | AdamW, lr 1e-4, constant, wd 1e-2, grad-norm clip 1.0 | §4.1 (lr); ours (rest) |
| batch | 16 in total (2 per GPU on 8 GPUs) | §4.1 |
| iterations | 30 000 | §4.1 |
| augmentation | short side 512 × U(0.8, 1.2), random 512² crop, horizontal flip | §4.1 |
| inference | DDIM trailing, S steps; ensemble of E seeds, mean in latent space; E×S = 8×2 | §3.7, Table 6 (58.6 mIoU) |
| thresholds | τ = 0.7 (mask and background); CLIP global 0.25; patch τ_patch = 0.25 (note 5) | §4 Fig. 3, A.3 |
| evaluation | image resized to 512², probabilities resized back to the annotation, mIoU over 150 classes | §4.1 |

Notes. (1) A.2 keeps "all other convolutional layers" frozen, but the widened conv_in is no
longer SD's: frozen, its tiled half-weights would add the image latent to the noisy mask latent
with the same filters, and the U-Net could not tell them apart; it is trained. (2) The paper's
MLP size and token count are not given. With a single token, softmax attention is constant over
space and cross-attention reduces to a per-class bias; K tokens let it vary. Cross-attention
layers at the other scales keep SD's empty-prompt context, so the frozen layers see what they
were trained on (`unet_seg.attention.context_slice_procs`). (3) Eq. 6 is written for ε; SD 2.1
(768) is a v-prediction model and we keep its parameterisation (as Marigold, whose fine-tuning
protocol DiGSeg follows); `--prediction-type epsilon` trains eq. 6 literally. With ε, one
trailing DDIM step at t = 999 divides the ε error by √ᾱ_999 ≈ 0.07. (4) The paper does not say
how training pairs are drawn; without absent classes the model never learns to answer "not in
this image", which the argmax over CLIP's candidates needs. (5) τ_patch is not given in A.3.
(6) `--demo` cannot use pretrained weights: a tiny random SD-structured U-Net (all of it
trained, lr 1e-3, `--trainable all`: the paper's frozen layers are random there), random tiny
CLIP towers, and the frozen weight-free `BlockCodec` in place of SD's VAE (see
recipes/diffews_coco20i.py note 4 for why a tiny VAE cannot stand in). Scenes of 1–3 objects
of five classes, one per form ("striped disc", "checkered ring", "dotted square", "speckled
triangle", "striped cross"), at 128² (at 64² the codec's 8×8 latent leaves an object 2–4
latent pixels: even the ground-truth latents decode to only 43 mIoU at τ = 0.7; 71 at 128²).
Candidates are all five classes (a random CLIP selects nothing meaningful). The random text
tower maps these prompts to nearly one direction (cosine up to 0.999), so the demo whitens the
five embeddings (`whiten`: a regular simplex), leaving the text pathway class identity only.
E×S = 1×10 beside 1×1: the under-trained tiny model's one-step estimate is the posterior mean,
which hedges between the classes (p ≈ 0.2 inside objects) and mostly stays below τ; ten DDIM
steps commit to a sample. A control row gives each class the next class's prompt. Measured
(150 steps, 24 test images): 1×10 20.9 mIoU, 1×1 17.7, majority baseline 14.5, control 21.0 —
the tiny model finds objects but does not tell the classes apart; 400 steps gave 16.6 / 14.4.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from unet_seg import load_sd
from unet_seg.attention import context_slice_procs, cross_attention_layers
from unet_seg.codecs import BlockCodec, latent_to_probability, mask_to_latent, masks_to_label_map
from unet_seg.diffusion import NoiseSchedule, ddim_sample, ddim_timesteps, ensemble_mean, multires_noise, q_sample, training_target
from unet_seg.losses import latent_mse
from unet_seg.metrics import all_reduce_confusion, confusion_matrix, iou_per_class, iou_table
from unet_seg.models import TINY_SD1_TEXT, TINY_SD2, TINY_SD2_TEXT, CLIPTextEncoder, CLIPTokenizer, UNet
from unet_seg.models.clip import CLIPTextEncoderWithProjection
from unet_seg.models.clip_vision import TINY_VIT, CLIPVisionEncoder, clip_preprocess, load_clip
from unet_seg.train import (
    autocast, barrier, check_finite_everywhere, cleanup_distributed, init_distributed, latest_checkpoint,
    load_checkpoint, maybe_compile, parse_recipe_args, print0, progress, recipe_parser, resumable_loader,
    save_checkpoint, seed_everything, training_batches, write_metrics,
)  # fmt: skip
from unet_seg.viz import image_to_uint8, overlay, save_grid

PROMPT = "A photo of a {}"  # A.3
THRESHOLD = 0.7  # τ, also the background threshold (§4 "Hyperparameter τ", A.3)
CLIP_THRESHOLD = 0.25  # A.3, global image-text cosine
PATCH_THRESHOLD = 0.25  # A.3 τ_patch: value not given
CLASS_TOKENS = 4  # note 2
ABSENT_PROB = 0.25  # note 4
DEMO = dict(size=128, steps=150, batch_size=8, lr=1e-3, ensemble=1, ddim_steps=10, images=100, trainable="all", threshold=0.7)
REAL = dict(size=512, steps=30000, batch_size=2, lr=1e-4, ensemble=8, ddim_steps=2, images=2000, trainable="paper", threshold=THRESHOLD)


def parse_args(argv=None) -> argparse.Namespace:
    p = recipe_parser(
        "DiGSeg: fine-tune SD 2.x to denoise per-class mask latents conditioned on the image latent and the class "
        "text; evaluate mIoU with E×S test-time settings. --demo runs on CPU with tiny random models and synthetic "
        "scenes (no download); otherwise give --model, --clip and --data-root.",
        DEMO, REAL, out="runs/digseg",
    )  # fmt: skip
    p.add_argument("--clip", default="openai/clip-vit-large-patch14", help="full CLIP ViT-L/14 (hub id or folder)")
    p.add_argument("--data-root", help="ADEChallengeData2016 folder (see unet_seg.data.ade20k)")
    p.add_argument("--candidates", choices=("all", "clip"), help="classes denoised per image: every class, or CLIP's "
                   "selection (A.3); default clip, demo all")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), help="default: the checkpoint's (demo: v)")
    p.add_argument("--trainable", choices=("paper", "all"), help=f"U-Net parameters trained ({REAL['trainable']}, demo {DEMO['trainable']})")
    p.add_argument("--ensemble", type=int, help=f"E, seeds averaged in latent space ({REAL['ensemble']}, demo {DEMO['ensemble']})")
    p.add_argument("--ddim-steps", type=int, help=f"S, DDIM-trailing steps ({REAL['ddim_steps']}, demo {DEMO['ddim_steps']})")
    p.add_argument("--threshold", type=float, help=f"τ, mask and background threshold ({REAL['threshold']}, demo {DEMO['threshold']})")
    p.add_argument("--images", type=int, help=f"test images ({REAL['images']}: all of ADE20K val; demo {DEMO['images']})")
    p.add_argument("--eval-every", type=int, default=0, help="mIoU on --eval-images test images every N steps (0: off)")
    p.add_argument("--eval-images", type=int, default=20, help="test images of the periodic evaluation")
    args = parse_recipe_args(p, argv, DEMO, REAL)
    args.candidates = args.candidates or ("all" if args.demo else "clip")
    if not args.demo and not args.data_root:
        p.error("--data-root is required without --demo")
    if min(args.ensemble, args.ddim_steps, args.images) < 1:
        p.error("--ensemble, --ddim-steps and --images must be >= 1")
    if args.ddim_steps > 1000:
        p.error(f"--ddim-steps must be <= 1000 (T), got {args.ddim_steps}")
    return args


# ---------------------------------------------------------------------------------------------
# The model: SD U-Net (conv_in 4 -> 8) + the text MLP, class tokens at latent/4 and latent/8


def class_token_layers(names) -> tuple[str, ...]:
    """The cross-attention layers that see the class tokens: latent/4 (down.2, up.1) and latent/8
    (the mid block) of SD's four-level U-Net (A.2 "1/4 and 1/8 resolutions")."""
    return tuple(n for n in cross_attention_layers(names) if n.startswith(("down.2.", "up.1.", "mid.")))


class DiGSeg(nn.Module):
    """The denoiser of eq. 6, ε_θ(y_t, z_x, t, t_c) (or v_θ, the schedule's parameterisation).

        forward(y_t [B, 4, h, w], z_x [B, 4, h, w], t [B], class_embeds [B, P]) -> [B, 4, h, w]

    context = [null_context (SD's empty prompt, [1, L0, D]) ; MLP(t_c) as K tokens]; the
    cross-attention layers of `class_token_layers` attend to the K class tokens, the others to
    the empty prompt. `unet` must already take 8 input channels (`widen_conv_in(8)`)."""

    def __init__(self, unet: UNet, text_dim: int, null_context: Tensor, tokens: int = CLASS_TOKENS):
        super().__init__()
        d = unet.config.context_dim
        self.unet, self.tokens = unet, tokens
        self.text_mlp = nn.Sequential(nn.Linear(text_dim, d), nn.GELU(), nn.Linear(d, tokens * d))
        self.register_buffer("null_context", null_context.detach().clone(), persistent=False)
        start = null_context.shape[1]
        text_layers = class_token_layers(unet.attention_names)
        others = [n for n in cross_attention_layers(unet.attention_names) if n not in text_layers]
        self.procs = {**context_slice_procs(others, 0, start), **context_slice_procs(text_layers, start, start + tokens)}

    def forward(self, y_t: Tensor, z_x: Tensor, t: Tensor, class_embeds: Tensor) -> Tensor:
        b = y_t.shape[0]
        tokens = self.text_mlp(class_embeds).unflatten(-1, (self.tokens, -1))
        context = torch.cat([self.null_context.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        return self.unet(torch.cat([z_x, y_t], dim=1), t, context, procs=self.procs)


def set_trainable(model: DiGSeg, which: str) -> list[nn.Parameter]:
    """Freeze all but the trained parameters (A.2, note 1) and return those: "paper" = conv_in,
    the cross-attention (and its LayerNorm) at latent/4, the mid-block transformer, the text MLP;
    "all" = everything."""
    paper = ("conv_in.", "mid_block.attentions.", "text_mlp.")
    cross = (".attn2.", ".norm2.")
    for name, p in model.named_parameters():
        name = name.removeprefix("unet.")
        at_quarter = name.startswith(("down_blocks.2.attentions.", "up_blocks.1.attentions.")) and any(c in name for c in cross)
        p.requires_grad_(which == "all" or name.startswith(paper) or at_quarter)
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def class_embeddings(text_encoder: CLIPTextEncoderWithProjection, tokenizer, names, device) -> Tensor:
    """Class names -> t_c = normalised CLIP text embeddings of "A photo of a {name}", [C, P] float32 (A.3)."""
    ids = tokenizer([PROMPT.format(n) for n in names]).to(device)
    return F.normalize(text_encoder.to(device).eval().text_embeds(ids).float(), dim=-1)


def whiten(embeds: Tensor) -> Tensor:
    """Class embeddings [C, P] -> [C, P]: centred over the vocabulary, decorrelated (ZCA, the
    rank-deficient directions dropped), normalised. For C <= P the rows form a regular simplex
    (pairwise cosine −1/(C−1)). Demo only (note 6): a random text tower maps different prompts
    to nearly one direction (cosine 0.999), which pretrained CLIP does not."""
    x = embeds - embeds.mean(0)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = s > s[0] * 1e-4
    return F.normalize(u[:, keep] @ vh[keep], dim=-1)


@torch.no_grad()
def candidate_classes(clip_vision: CLIPVisionEncoder, images: Tensor, class_embeds: Tensor,
                      threshold: float = CLIP_THRESHOLD, patch_threshold: float = PATCH_THRESHOLD) -> Tensor:
    """CLIP's candidate classes (A.3): images [B, 3, H, W] in [-1, 1], class_embeds [C, P]
    normalised -> bool [B, C]: cos(v, t_c) > threshold, or max over patches p of cos(v_p, t_c) >
    patch_threshold (patch tokens through CLIP's head). An image with no candidate keeps its best class."""
    out = clip_vision(clip_preprocess(images, clip_vision.config.image_size).to(class_embeds.device))
    t = class_embeds.to(out.image_embeds.dtype)
    image_score = F.normalize(out.image_embeds, dim=-1) @ t.T  # [B, C]
    patch_score = (F.normalize(clip_vision.project(out.patch_tokens), dim=-1) @ t.T).amax(1)  # [B, C]
    keep = (image_score > threshold) | (patch_score > patch_threshold)
    best = F.one_hot(image_score.argmax(1), t.shape[0]).bool()
    return torch.where(keep.any(1, keepdim=True), keep, best)


# ---------------------------------------------------------------------------------------------
# Training


def training_pairs(labels: Tensor, class_ids: Tensor, absent_prob: float) -> tuple[Tensor, Tensor]:
    """labels [B, H, W] (dataset labels, 255 ignore) -> (vocabulary index [B], binary mask [B, H, W]):
    per image a class present in it, or with probability `absent_prob` (always, when none is
    present) one absent from it, whose mask is empty. Draws from the global RNG."""
    picks = []
    for lab in labels:
        present = torch.isin(class_ids, lab.unique().to(class_ids.device))
        pool = present if (present.any() and torch.rand(()) >= absent_prob) else ~present
        choice = pool.nonzero()[:, 0]
        picks.append(choice[torch.randint(len(choice), ())])
    index = torch.stack(picks).to(labels.device)
    masks = (labels == class_ids.to(labels.device)[index].view(-1, 1, 1)).long()
    return index, masks


def train_step(model, params, vae, schedule: NoiseSchedule, opt, images, masks, class_embeds) -> Tensor:
    """One optimiser step of eq. 6 (`model`: DiGSeg as called, possibly compiled or DDP-wrapped;
    `params`: what it trains). images [B, 3, H, W], masks [B, H, W] in {0, 1}, class_embeds [B, P]."""
    with torch.no_grad():
        z_x, z_y = vae.encode(images), mask_to_latent(vae, masks)
        t = torch.randint(0, schedule.num_train_timesteps, (images.shape[0],), device=images.device)
        noise = multires_noise(z_y, t, schedule.num_train_timesteps)  # A.1, annealed
        y_t = q_sample(z_y, noise, t, schedule)
        target = training_target(z_y, noise, t, schedule)
    with autocast(images.device):
        pred = model(y_t, z_x, t, class_embeds)
    loss = check_finite_everywhere(latent_mse(pred.float(), target.float()), "DiGSeg loss")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss


# ---------------------------------------------------------------------------------------------
# Inference


@torch.no_grad()
def predict_probabilities(model, vae, schedule: NoiseSchedule, images: Tensor, class_embeds: Tensor,
                          ensemble: int, ddim_steps: int, noise: Optional[Tensor] = None) -> Tensor:
    """images [B, 3, H, W], class_embeds [K, P] (the same candidates for every image) -> class
    probabilities [B, K, H, W]: for each (image, class), `ensemble` DDIM-trailing runs of
    `ddim_steps` steps from N(0, I) (`noise` [E, B·K, 4, h, w], image-major; default drawn from
    the global RNG), averaged in latent space, decoded (§3.7, A.3). The image is encoded once and
    its latent shared by its K classes: all K·E runs go through each denoiser call together."""
    b, k = images.shape[0], class_embeds.shape[0]
    z_x = vae.encode(images).repeat_interleave(k, dim=0)  # [B·K, 4, h, w], image-major
    cond = class_embeds.repeat(b, 1)  # [B·K, P]
    timesteps = ddim_timesteps(ddim_steps, schedule.num_train_timesteps, "trailing")

    def run(noise: Tensor) -> Tensor:  # [r·B·K, 4, h, w], r ensemble members stacked run-major
        r = noise.shape[0] // z_x.shape[0]
        zx, c = z_x.repeat(r, 1, 1, 1), cond.repeat(r, 1)
        with autocast(images.device):
            return ddim_sample(lambda x, t: model(x, zx, t, c).float(), noise, timesteps, schedule)

    if noise is None:
        noise = torch.randn(ensemble, *z_x.shape, device=images.device)
    elif noise.shape != (ensemble, *z_x.shape):
        raise ValueError(f"noise must be [E, B·K, 4, h, w] = {[ensemble, *z_x.shape]}, got {list(noise.shape)}")
    z = ensemble_mean(run, noise)
    return latent_to_probability(vae, z.to(images.dtype)).unflatten(0, (b, k))


def segment(prob: Tensor, candidates: Tensor, class_ids: Tensor, background: int, threshold: float = THRESHOLD) -> Tensor:
    """prob [B, K, H, W] of the vocabulary classes `candidates` [K] -> labels [B, H, W]: pixel-wise
    argmax, `background` where the best probability is below τ = `threshold` (A.3)."""
    index = masks_to_label_map(prob, prob.shape[1], threshold)  # K = below τ
    table = torch.cat([class_ids.to(prob.device)[candidates.to(prob.device)], torch.tensor([background], device=prob.device)])
    return table[index]


# ---------------------------------------------------------------------------------------------
# Evaluation


def fields(batch) -> tuple[Tensor, Tensor]:
    """(images, labels) of a batch or an item: synthetic (image, labels) tuples or ADE20K dicts."""
    return (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])


@torch.no_grad()
def evaluate(model, vae, schedule, data, class_embeds, class_ids, vocab, settings, size: int, device, seed: int,
             clip_vision=None, control: bool = False, threshold: float = THRESHOLD):
    """This rank's share of `data` -> ({name: all-rank confusion matrix [N, N]}, {name: images/s},
    up to 4 (image, prediction, labels) to draw). One row per E×S setting in `settings`, the
    majority-label baseline, and with `control` DiGSeg with every class's prompt replaced by the
    next class's (a model that reads its prompts loses accuracy there). `vocab`: (num_labels,
    background label, majority label). Images are resized to size² and the probabilities back to
    the labels' size; with `clip_vision`, each image gets CLIP's candidates, else all classes.
    Eval mode, own RNG stream (the noise draws, seeded by `seed`); training mode and RNG restored."""
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = _evaluate(model, vae, schedule, data, class_embeds, class_ids, vocab, settings, size, device, clip_vision,
                        control, threshold)
    model.train(was_training)
    return out


def _evaluate(model, vae, schedule, data, class_embeds, class_ids, vocab, settings, size, device, clip_vision, control, threshold):
    num_labels, background, majority = vocab
    world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if torch.distributed.is_initialized() else (1, 0)
    subset = torch.utils.data.Subset(data, range(rank, len(data), world))
    runs = {f"DiGSeg {e}x{s}": (e, s, class_embeds) for e, s in settings}
    if control:
        e, s = settings[-1]
        runs["control: DiGSeg, prompts of the next class"] = (e, s, class_embeds.roll(-1, 0))
    conf = {n: torch.zeros(num_labels, num_labels, dtype=torch.long, device=device) for n in [*runs, "baseline: majority label"]}
    seconds = dict.fromkeys(runs, 0.0)
    shown = []
    square = fields(data[0])[1].shape == (size, size)  # synthetic scenes: all size², batched
    for batch in torch.utils.data.DataLoader(subset, batch_size=8 if square and clip_vision is None else 1):
        images, labels = (x.to(device) for x in fields(batch))
        inputs = images if images.shape[-2:] == (size, size) else F.interpolate(images, (size, size), mode="bilinear", antialias=True).clamp(-1, 1)
        candidates = torch.arange(len(class_ids), device=device)
        if clip_vision is not None:  # one image per batch: its own candidates
            candidates = candidate_classes(clip_vision, images, class_embeds)[0].nonzero()[:, 0]
        for name, (e, s, embeds) in runs.items():
            start = time.perf_counter()
            prob = predict_probabilities(model, vae, schedule, inputs, embeds[candidates], e, s)
            if prob.shape[-2:] != labels.shape[-2:]:
                prob = F.interpolate(prob, labels.shape[-2:], mode="bilinear")
            pred = segment(prob, candidates, class_ids, background, threshold)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start
            conf[name] += confusion_matrix(pred, labels, num_labels)
            if name == f"DiGSeg {settings[-1][0]}x{settings[-1][1]}" and len(shown) < 4:  # the main setting
                shown += list(zip(images, pred, labels))[: 4 - len(shown)]
        conf["baseline: majority label"] += confusion_matrix(torch.full_like(labels, majority), labels, num_labels)
    total = sum(1 for _ in subset) * world
    return {n: all_reduce_confusion(c) for n, c in conf.items()}, {n: total / max(s * world, 1e-9) for n, s in seconds.items()}, shown


def summarise(conf: Tensor, scored: list[int]) -> dict:
    """mIoU over the labels `scored` and pixel accuracy over all labelled pixels, in %."""
    iou = iou_per_class(conf)[scored]
    acc = conf.diagonal().sum() / conf.sum().clamp(min=1)
    return {"mIoU": round(100 * iou.nanmean().item(), 2), "aAcc": round(100 * acc.item(), 2)}


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    rank, world, local_rank, device = init_distributed()
    if args.demo:
        print0(
            "DEMO: tiny random-weight SD-structured U-Net and CLIP towers, a frozen 8x8 block codec in place of SD's VAE, "
            f"synthetic scenes with class names as prompts, {device.type.upper()}, no download "
            "(real runs: --model <SD 2.x> --clip <CLIP ViT-L/14> --data-root <ADEChallengeData2016>)"
        )
    seed_everything(args.seed, rank)
    args.out.mkdir(parents=True, exist_ok=True)

    # ---- data: label vocabulary, training and test sets
    if args.demo:
        from unet_seg.data.synthetic import CLASS_NAMES, SemanticScenes, fold_split

        classes = fold_split(0)[1]  # five classes, one per form: "striped disc", "checkered ring", ...
        names, class_ids = [CLASS_NAMES[c] for c in classes], torch.tensor(classes)
        vocab, label_names = (len(CLASS_NAMES), 0, 0), CLASS_NAMES  # background 0 (the majority)
        train_data = SemanticScenes(args.seed, 100_000, size=args.size, classes=classes, objects=(1, 3))
        test_data = SemanticScenes(args.seed + 1, args.images, size=args.size, classes=classes, objects=(1, 3))
        scored = [0, *classes]
    else:
        from unet_seg.data.ade20k import ADE20K, ADE20K_CLASSES
        from unet_seg.data.transforms import RandomResizeCropFlip

        names, class_ids = ADE20K_CLASSES, torch.arange(len(ADE20K_CLASSES))
        vocab, label_names = (len(names) + 1, len(names), 0), (*names, "(below τ)")  # majority: wall
        augment = RandomResizeCropFlip(crop=(args.size, args.size), scale=(4 * args.size, args.size), ratio_range=(0.8, 1.2))
        train_data = ADE20K(args.data_root, "training", transform=augment, seed=args.seed)
        test_data = ADE20K(args.data_root, "validation")
        test_data = torch.utils.data.Subset(test_data, range(min(args.images, len(test_data))))
        scored = list(range(len(names)))

    # ---- models: SD U-Net (conv_in 4 -> 8) + text MLP; frozen VAE, SD text encoder (empty prompt), CLIP
    if args.demo:
        torch.manual_seed(args.seed)
        unet, vae = UNet(TINY_SD2), BlockCodec()
        sd_text, tokenizer = CLIPTextEncoder(TINY_SD2_TEXT), CLIPTokenizer.from_bpe(pad_token="!")
        clip_text, clip_tokenizer = CLIPTextEncoderWithProjection(TINY_SD1_TEXT, projection_dim=32), CLIPTokenizer.from_bpe()
        clip_vision = CLIPVisionEncoder(TINY_VIT)
        schedule = NoiseSchedule.sd(args.prediction_type or "v_prediction")
    else:
        sd = load_sd(args.model, vae_dtype=torch.float32)
        unet, vae, sd_text, tokenizer = sd.unet, sd.vae, sd.text_encoder, sd.tokenizer
        clip_text, clip_vision = load_clip(args.clip)
        clip_tokenizer = CLIPTokenizer.from_bpe()  # CLIP's published vocabulary, padded with EOS as openai's
        schedule = NoiseSchedule(sd.schedule.alphas_cumprod, args.prediction_type or sd.schedule.prediction_type)
    with torch.no_grad():
        null_context = sd_text.to(device).eval()(tokenizer([""]).to(device))  # [1, 77, D]
    class_embeds = class_embeddings(clip_text, clip_tokenizer, names, device)  # [C, P], cached (A.3)
    if args.demo:  # note 6
        class_embeds = whiten(class_embeds)
    del sd_text, clip_text
    clip_vision = clip_vision.to(device).eval() if args.candidates == "clip" else None
    torch.manual_seed(args.seed)
    model = DiGSeg(unet.widen_conv_in(8), class_embeds.shape[1], null_context).to(device).train()
    vae.to(device).eval().requires_grad_(False)
    if device.type == "cuda":  # NHWC convolutions (benchmarks/NOTES.md)
        model.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    params = set_trainable(model, args.trainable)
    print0(f"training {sum(p.numel() for p in params) / 1e6:.2f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
           f"parameters ({args.trainable}); {schedule.prediction_type} objective; {len(names)} classes")
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    step, models = 0, {"digseg": model}
    if args.resume and latest_checkpoint(args.out) is not None:
        step = load_checkpoint(latest_checkpoint(args.out), models, opt).step
        print0(f"resumed from step {step}")
    wrapped = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else model
    forward = maybe_compile(wrapped, args.compile)
    if args.compile and not args.demo:
        vae.encoder.compile()
        vae.decoder.compile()
    settings = [(1, 1), (args.ensemble, args.ddim_steps)] if args.demo else [(args.ensemble, args.ddim_steps)]
    settings = list(dict.fromkeys(settings))

    # ---- train: eq. 6 on (image, class) pairs
    loader = resumable_loader(train_data, args.batch_size, args.seed, num_workers=0 if args.demo else 4)
    bar = progress(total=args.steps, initial=step, desc="DiGSeg")
    for step, epoch, batch in training_batches(loader, step, args.steps):
        images, labels = (x.to(device) for x in fields(batch))
        index, masks = training_pairs(labels, class_ids, ABSENT_PROB)
        loss = train_step(forward, params, vae, schedule, opt, images, masks, class_embeds[index])
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(args.out, step, models, opt, None, epoch, extra={"args": str(vars(args))}, keep_last=2)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            quick = torch.utils.data.Subset(test_data, range(min(args.eval_images, len(test_data))))
            conf, _, _ = evaluate(model, vae, schedule, quick, class_embeds, class_ids, vocab, settings[:1], args.size,
                                  device, args.seed, clip_vision, threshold=args.threshold)
            miou = summarise(next(iter(conf.values())), scored)["mIoU"]
            print0(f"step {step}: mIoU {miou:.2f} on {len(quick)} test images ({settings[0][0]}x{settings[0][1]})")
    bar.close()
    train_time = time.perf_counter() - started

    # ---- eval: E×S settings, the majority-label baseline, (demo) the shuffled-prompt control
    conf, speed, shown = evaluate(model, vae, schedule, test_data, class_embeds, class_ids, vocab, settings, args.size,
                                  device, args.seed, clip_vision, control=args.demo, threshold=args.threshold)
    metrics = {n: {**summarise(c, scored), **({"images/s": round(speed[n], 2)} if n in speed else {})} for n, c in conf.items()}
    first = next(iter(conf))
    if args.demo:  # the scene classes and background: nothing else is ever predicted
        print0(iou_table(conf[first][scored][:, scored], [label_names[c] for c in scored]))
    else:
        print0(iou_table(conf[first], list(label_names)))
    wall = time.perf_counter() - started
    title = f"DiGSeg, {len(test_data)} test images" + (" (DEMO: synthetic)" if args.demo else " (ADE20K-150 val)")
    table = write_metrics(metrics, args.out / "metrics", title=title)
    if shown and rank == 0:
        shift = 0 if args.demo else 1  # ADE20K's class 0 (wall) gets a colour: overlay leaves label 0 untinted
        draw = lambda x, lab: overlay(x, torch.where(lab == 255, 255, lab + shift).cpu(), alpha=0.6)  # noqa: E731
        rows = [[image_to_uint8(x), draw(x, p), draw(x, y)] for x, p, y in shown]
        save_grid(rows, args.out / "predictions.png", titles=["image", "prediction", "ground truth"], scale=2 if args.demo else 1)
    print0("\n" + table)
    print0(f"train {train_time:.0f} s, total {wall:.0f} s on {world} process(es); wrote {args.out}/metrics.md, .json, predictions.png")
    barrier()
    cleanup_distributed()
    return metrics


if __name__ == "__main__":
    main()
