"""DiGSeg semantic segmentation on ADE20K-150 (closed or open vocabulary), or on synthetic scenes
with `--demo`.

Wang et al., "Diffusion Model as a Generalist Segmentation Learner" (DiGSeg; paper text with
appendix: ../shared/design/papers/digseg.txt). No official code was found: the paper's
statements are the defaults, our readings of what it leaves open are marked "ours".

    python recipes/digseg_ade20k.py --demo                                      # CPU, minutes, no download
    torchrun --nproc_per_node=8 recipes/digseg_ade20k.py --model stabilityai/stable-diffusion-2-base \\
        --clip openai/clip-vit-large-patch14 --data-root /data/ADEChallengeData2016

Method (one training sample = an image and one class c; one denoising run per candidate class):

    z_x = E(image),  z_y = E(white-on-black mask of c)                       VAE frozen (§3.4)
    t_c = CLIP_text("A photo of a {c}") / ‖·‖                                CLIP ViT-L/14, cached (A.3)
    ctx = [SD text encoder("") (77 tokens) ; MLP(t_c) (K tokens)]            class tokens at latent/4, /8
    ε   ~ multi-resolution noise, annealed (A.1; Marigold's construction: unet_seg.diffusion)
    L   = ‖ε − ε_θ(cat(z_x, √ᾱ_t z_y + √(1−ᾱ_t) ε), t, ctx)‖²              eq. 6, conv_in widened 4 -> 8
    p_c = decoded mean of E DDIM-trailing runs of S steps; label = argmax_c p_c (+ τ floor)    §3.7, A.3

| setting | paper | official code | here | why |
|---|---|---|---|---|
| backbone | "SDv2" (§4.1), ε (eq. 6), 512² (§4.1); VAE frozen | none released | `stabilityai/stable-diffusion-2-base` | 512², ε-trained: fits all three (2.1's 768-v does not) |
| trained | cross-attention at 1/4 and 1/8, mid attention, a small MLP (A.2) | – | latent/4 cross-attention, mid transformer, MLP, conv_in (note 1) | conv_in: the widened input |
| text | CLIP ViT-L/14 embedding of "A photo of a {c}" (A.3) | – | same, 4 class tokens via Linear–GELU–Linear (note 2) | MLP size: ours |
| objective | ε-prediction MSE, eq. 6 | – | ε; `--prediction-type v_prediction` (note 3) | eq. 6 |
| training noise | multi-res. + annealed (Table 4: +1.9 mIoU), formula not given | – | Marigold "original", s = 0.9, ×t/T | A.1 matches Marigold's release |
| schedule, optimiser | DDPM T = 1000; AdamW lr 1e-4; batch 16; 30 000 its (§4.1) | – | same; wd 1e-2, clip 1.0, constant lr | rest: ours |
| training pairs | not described | – | a present class, or (p = 0.25) an absent one with an empty mask | ours (note 4) |
| mask target | per class (A.3); a label map in 3 channels, palette decoding (§3.4, App. B) | – | per class; `--target label-map` (note 8) | A.3 is the inference described |
| augmentation | "resize the input images to 512 × 512, random horizontal flip and scale jittering in [0.8, 1.2]" (§4.1) | – | same: squashed to 512²·U(0.8, 1.2), 512² crop (pad 0 / ignore), flip | |
| inference | DDIM trailing; E seeds averaged in latent space; 8×2 = 58.6, 1×1 = 56.8 (Table 6) | – | same | |
| labels | argmax over candidates, background below τ_bg (A.3); τ = 0.7 (§4) | – | both rows: plain argmax, and τ = 0.7 floor (note 5) | ADE20K-150 has no background |
| candidates | CLIP global cos > 0.25 or any patch > τ_patch (A.3) | – | `--candidates clip` and/or `all`; τ_patch = 0.25 | τ_patch not given: the global value |
| speed | 11.27 FPS at 1×1, 3.15 at 8×2 (Table 6) | – | images/s and class runs/s (note 6) | |
| evaluation | ADE20K-150 val, 512² input (§4.1, Table 2) | – | squashed to 512² as in training, probabilities back to the label size | |

Notes. (1) Frozen, the widened conv_in's tiled half-weights would add the image latent to the
noisy mask latent with the same filters. (2) With one token, cross-attention reduces to a
per-class bias; K tokens let it vary over space. (3) SD 2.1 (768) and Marigold use v; with ε one
trailing DDIM step at t = 999 divides the ε error by √ᾱ_999 ≈ 0.07. (4) Without absent classes the model
never learns "not in this image", which the argmax over CLIP's candidates needs. (5) A.3 floors
max_c p_c < τ_bg to "background"; on ADE20K-150 there is no such class (label 0 "other" is
ignored), so a floored pixel is always an error: plain argmax is the protocol its 58.6 implies,
the floor the literal rule (right for the demo, whose scenes have a background). (6) 11.27 FPS at
1×1 is ~89 ms per image, about one VAE encode + one U-Net call + one decode at 512²: the paper
times one run per image, not one per candidate class (ADE20K images hold ~10). Per-class runs
cost K times more per image; "class runs/s" is the number comparable to the paper's FPS.
(7) `--demo`: the packaged tiny SD pre-trained on captioned synthetic scenes (`--random-demo-model`:
random weights; all trained, lr 1e-3), random tiny CLIP towers with the five
prompts whitened (`unet_seg.demo.whiten`), the weight-free `BlockCodec` for SD's VAE, at 128² (its
ground-truth latents decode to 69 mIoU, 41 at 64²). Every scene holds 2–3 objects of distinct
classes, so a mask needs the prompt; the control gives each class the next class's prompt. The
classes are in the codec's latents (a conv probe trained on them: 73 mIoU) and `--target
label-map` learns them in 150 steps, but the per-class model does not read its prompts, from either
start: from random weights it turns down the latent/4 and /8 path where they enter in 50 steps
(output gain ÷70), then ignores them; from the packaged SD the path stays open (gain 0.011-0.015)
and the prompts still do not steer the mask (docs/recipes/digseg.md).
(8) `--target label-map` reads §3.4 / App. B instead: the label map painted in a palette (one
colour per class, `codecs.make_palette`; App. B's grey replication would put ADE20K's 150 classes
0.013 apart) is the target, and one run per image is decoded by the nearest colour: the per-image
work of Table 6's FPS (note 6). The paper does not say what conditions such a run; here a zero
embedding (no prompt: the palette fixes the classes), so no open vocabulary and no control row.
"""

from __future__ import annotations

import argparse
import functools
import time

from unet_seg.cli import add_validation, parse_recipe_args, recipe_parser, run

PROMPT = "A photo of a {}"  # A.3
THRESHOLD = 0.7  # τ, also the background threshold (§4 "Hyperparameter τ", A.3)
CLIP_THRESHOLD = 0.25  # A.3, global image-text cosine
PATCH_THRESHOLD = 0.25  # A.3 τ_patch: value not given; the global threshold's
CLASS_TOKENS = 4  # note 2
ABSENT_PROB = 0.25  # note 4
DEMO = dict(size=128, steps=150, batch_size=8, lr=1e-3, ensemble=1, ddim_steps=10, eval_items=100, trainable="all", threshold=0.7)
REAL = dict(size=512, steps=30000, batch_size=2, lr=1e-4, ensemble=8, ddim_steps=2, eval_items=0, trainable="paper", threshold=THRESHOLD, model="stabilityai/stable-diffusion-2-base")


def parse_args(argv=None) -> argparse.Namespace:
    p = recipe_parser(
        "DiGSeg: fine-tune SD 2.x to denoise per-class mask latents conditioned on the image latent and the class "
        "text; evaluate mIoU with E×S test-time settings. --demo runs on CPU with tiny models (a pre-trained SD, else random) and synthetic "
        "scenes (no download); otherwise give --model, --clip and --data-root.",
        DEMO, REAL, out="runs/digseg", eval_items="test images",
    )  # fmt: skip
    p.add_argument("--clip", default="openai/clip-vit-large-patch14", help="full CLIP ViT-L/14 (hub id or folder)")
    p.add_argument("--data-root", help="ADEChallengeData2016 folder (see unet_seg.data.ade20k)")
    p.add_argument("--candidates", nargs="+", choices=("clip", "all"), help="classes denoised per image, one row "
                   "each: CLIP's selection (A.3) and/or every class; default clip, demo all")
    p.add_argument("--target", choices=("class-masks", "label-map"), default="class-masks", help="one white-on-black "
                   "mask per class, a run per (image, class) (A.3); or the whole label map as a palette image, one "
                   "run per image, no class prompt and no candidates (§3.4, App. B; note 8)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                   help="ε (eq. 6) or v (SD 2.1-768's and Marigold's parameterisation)")
    p.add_argument("--trainable", choices=("paper", "all"), help=f"U-Net parameters trained ({REAL['trainable']}, demo {DEMO['trainable']})")
    p.add_argument("--ensemble", type=int, help=f"E, seeds averaged in latent space ({REAL['ensemble']}, demo {DEMO['ensemble']})")
    p.add_argument("--ddim-steps", type=int, help=f"S, DDIM-trailing steps ({REAL['ddim_steps']}, demo {DEMO['ddim_steps']})")
    p.add_argument("--threshold", type=float, help=f"τ, mask and background threshold ({REAL['threshold']}, demo {DEMO['threshold']})")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, help="replay each training step (VAE encode, "
                   "U-Net forward and backward, optimiser) as one CUDA graph: the host no longer paces the GPU; default: on "
                   "where the run has a GPU")
    add_validation(p, "test images", 20)
    p.predict_group.add_argument("--classes", help='your own class names, comma-separated ("cat,grass,sky"): the model is '
                                 "open-vocabulary; 0 in the output where none reaches τ")
    args = parse_recipe_args(p, argv, DEMO, REAL, data=["--data-root"], dataset="ADE20K")
    if args.predict:
        return args
    args.candidates = ["all"] if args.target == "label-map" else list(dict.fromkeys(args.candidates or ["all" if args.demo else "clip"]))
    for flag, value in (("--ensemble", args.ensemble), ("--ddim-steps", args.ddim_steps)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if args.ddim_steps > 1000:
        p.error(f"--ddim-steps must be <= 1000 (T), got {args.ddim_steps}")
    return args


if __name__ == "__main__":
    parse_args()  # usage errors here, before the seconds that importing torch takes
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unet_seg import load_sd
from unet_seg.attention import context_slice_procs, cross_attention_layers
from unet_seg.codecs import labels_to_palette_latent, make_palette, mask_to_latent
from unet_seg.demo import demo_sd, whiten
from unet_seg.diffusion import NoiseSchedule, multires_noise, q_sample, training_target
from unet_seg.losses import latent_mse
from unet_seg.metrics import all_reduce_confusion, confusion_matrix, iou_per_class, iou_table
from unet_seg.models import TINY_SD1_TEXT, CLIPTokenizer, UNet
from unet_seg.models.clip import CLIPTextEncoderWithProjection
from unet_seg.models.clip_vision import TINY_VIT, CLIPVisionEncoder
from unet_seg.pretrained import load_clip
from unet_seg.errors import InputError
from unet_seg.predict import Predictor, default_device, load_checkpoint_for_export, load_tensors, palette_for, predict_files, read_export, save_export, trained_tensors
from unet_seg.segmentation import PROGRESS_DELAY, candidates_to_labels, class_mask_pairs, clip_candidates, denoise_class_masks, denoise_label_maps, resize_labels
from unet_seg.train import (
    CudaGraphStep, autocast, backward_and_step, check_finite_everywhere, evaluation, finish_run, head, print0, progress, rank_share, resumable_loader,
    resume_latest, same_init_on_every_rank, sanity_check, save_checkpoint, should_checkpoint, start_run, training_batches, use_cuda_graph, wrap_for_training,
)  # fmt: skip
from unet_seg.viz import image_to_uint8, overlay, save_grid


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
def class_embeddings(text_encoder: CLIPTextEncoderWithProjection, names, device, demo: bool = False) -> Tensor:
    """Class names -> t_c = normalised CLIP text embeddings of "A photo of a {name}", [C, P] float32 (A.3);
    `demo`: whitened (note 7). CLIP's published vocabulary, padded with EOS as openai's."""
    ids = CLIPTokenizer.from_bpe()([PROMPT.format(n) for n in names]).to(device)
    embeds = F.normalize(text_encoder.to(device).eval().text_embeds(ids).float(), dim=-1)
    return whiten(embeds) if demo else embeds


def draw_noise(z_y: Tensor, schedule: NoiseSchedule) -> tuple[Tensor, Tensor]:
    """A training step's t [B] (uniform over the schedule) and annealed multi-resolution noise
    [B, 4, h, w] (A.1) for the target latents z_y. The noise's pyramid sizes are drawn on the host:
    draw them outside a CUDA graph and hand them to `train_step`."""
    t = torch.randint(0, schedule.num_train_timesteps, (z_y.shape[0],), device=z_y.device)
    return t, multires_noise(z_y, t, schedule.num_train_timesteps)


def train_step(model, params, vae, schedule: NoiseSchedule, opt, images, z_y, class_embeds, t, noise) -> Tensor:
    """One optimiser step of eq. 6 (`model`: DiGSeg as called, possibly compiled or DDP-wrapped;
    `params`: what it trains). images [B, 3, H, W], z_y [B, 4, h, w] the target latent (a class
    mask's or the label map's, `target_latents`), class_embeds [B, P], t and noise from `draw_noise`
    -> the loss. No host sync (a CUDA graph can hold it): a non-finite loss skips the update on
    the device; the caller reads the loss (`check_finite_everywhere`) to stop the run."""
    with torch.no_grad():
        z_x = vae.encode(images)
        y_t = q_sample(z_y, noise, t, schedule)
        target = training_target(z_y, noise, t, schedule)
    with autocast(images.device):
        pred = model(y_t, z_x, t, class_embeds)
    return backward_and_step(opt, params, latent_mse(pred.float(), target.float()), max_norm=1.0)  # no host sync: a non-finite loss skips the update on the device


@torch.no_grad()
def target_latents(vae, labels, class_embeds, class_ids, palette=None) -> tuple[Tensor, Tensor]:
    """Dataset labels [B, H, W] -> (z_y [B, 4, h, w], conditioning [B, P]) on class_embeds' device: a
    present (or absent, note 4) class's mask and embedding (A.3), the class picked on the host (from
    the loader's CPU labels: no device sync); with `palette` [C + 1, 3] (note 8) the label map painted
    palette[i] for class_ids[i], the last colour elsewhere (demo background), and a zero embedding."""
    device = class_embeds.device
    if palette is None:
        index, masks = class_mask_pairs(labels.cpu(), class_ids.cpu(), ABSENT_PROB)
        return mask_to_latent(vae, masks.to(device), check=False), class_embeds[index.to(device)]  # binary by construction
    labels = labels.to(device)
    lookup = torch.full((256,), len(class_ids), dtype=torch.long, device=labels.device)
    lookup[class_ids.to(labels.device)], lookup[255] = torch.arange(len(class_ids), device=labels.device), 255
    return labels_to_palette_latent(vae, lookup[labels], palette), class_embeds.new_zeros(len(labels), class_embeds.shape[1])


# ---------------------------------------------------------------------------------------------
# Evaluation


def segment_batch(model, vae, schedule, inputs, embeds, keep, ensemble_steps, out_size, class_ids, background, rules: dict, palette=None) -> dict:
    """Inputs at the training size -> {rule: class ids [B, *out_size]}: the class masks of candidates `keep`
    denoised (E×S), at `out_size`, each rule's τ floor (None: argmax); with `palette` (note 8) one label map."""
    if palette is not None:
        index = denoise_label_maps(model, vae, schedule, inputs, embeds.new_zeros(1, embeds.shape[1]), palette, *ensemble_steps)
        return dict.fromkeys(rules, torch.cat([class_ids, class_ids.new_tensor([background])]).to(index.device)[resize_labels(index, out_size)])
    prob = denoise_class_masks(model, vae, schedule, inputs, embeds[keep], *ensemble_steps)
    prob = prob if prob.shape[-2:] == out_size else F.interpolate(prob, out_size, mode="bilinear")
    return {r: candidates_to_labels(prob, keep, class_ids, background, tau) for r, tau in rules.items()}


@torch.no_grad()
def evaluate(model, data, *, vae, schedule, class_embeds, class_ids, vocab, settings, size: int, device, seed: int,
             modes=("all",), clip_vision=None, control: bool = False, threshold: float = THRESHOLD, palette=None):
    """This rank's share of `data` -> ({row: all-rank confusion [N, N]}, {row: images/s, class
    runs/s}, up to 4 (image, prediction, labels)). Rows: E×S `settings` × candidate `modes` ("all",
    or "clip" from `clip_vision`) × {plain argmax, τ floor}; the majority baseline (`vocab`:
    num_labels, background, majority); with `control`, the last setting with each class's prompt
    replaced by the next class's; with `palette` (note 8) one run per image and setting. In
    `train.evaluation`: eval mode, own RNG stream seeded by `seed`."""
    with evaluation(model, seed=seed, device=device):
        num_labels, background, majority = vocab
        subset = rank_share(data)
        runs = {f"DiGSeg {e}x{s}" + (f", {m} candidates" if len(modes) > 1 else ""): (e, s, m, class_embeds) for e, s in settings for m in modes}
        if control:
            runs["control: DiGSeg, prompts of the next class"] = (*settings[-1], modes[0], class_embeds.roll(-1, 0))
        rules = {"argmax": None, f"τ {threshold}": threshold}
        if palette is not None:  # note 8
            runs = {f"DiGSeg label map {e}x{s}": (e, s, None, class_embeds.new_zeros(1, class_embeds.shape[1])) for e, s in settings}
            rules = {"nearest colour": None}
        names = [f"{n}, {r}" for n in runs for r in rules] + ["baseline: majority label"]
        conf = {n: torch.zeros(num_labels, num_labels, dtype=torch.long, device=device) for n in names}
        seconds, class_runs, shown = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0), []
        square = data[0]["label"].shape == (size, size)  # synthetic scenes: all size², batched
        bar = progress(total=len(subset), desc="evaluating", unit="image", delay=PROGRESS_DELAY, leave=False)
        for batch in torch.utils.data.DataLoader(subset, batch_size=8 if square and "clip" not in modes else 1):
            images, labels = batch["image"].to(device), batch["label"].to(device)
            inputs = images if images.shape[-2:] == (size, size) else F.interpolate(images, (size, size), mode="bilinear").clamp(-1, 1)  # as training
            candidates = {"all": torch.arange(len(class_ids), device=device)}
            if "clip" in modes:  # one image per batch: its own candidates
                candidates["clip"] = clip_candidates(clip_vision, images, class_embeds, CLIP_THRESHOLD, PATCH_THRESHOLD)[0].nonzero()[:, 0]
            for name, (e, s, mode, embeds) in runs.items():
                start = time.perf_counter()
                preds = segment_batch(model, vae, schedule, inputs, embeds, candidates.get(mode), (e, s), labels.shape[-2:], class_ids, background, rules, palette)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[name] += time.perf_counter() - start
                class_runs[name] += len(images) * (1 if palette is not None else len(candidates[mode]))
                for r, pred in preds.items():
                    conf[f"{name}, {r}"] += confusion_matrix(pred, labels, num_labels)
                if name == next(iter(runs)) and len(shown) < 4:
                    shown += list(zip(images, preds[next(iter(rules))], labels))[: 4 - len(shown)]
            conf["baseline: majority label"] += confusion_matrix(torch.full_like(labels, majority), labels, num_labels)
            bar.update(len(images))
        bar.close()
        speed = {f"{n}, {r}": {"images/s": round(len(subset) / max(t, 1e-9), 2), "class runs/s": round(class_runs[n] / max(t, 1e-9), 2)}
                 for n, t in seconds.items() for r in rules}  # fmt: skip
        return {n: all_reduce_confusion(c) for n, c in conf.items()}, speed, shown


def summarise(conf: Tensor, scored: list[int]) -> dict:
    """mIoU over the labels `scored` and pixel accuracy over all labelled pixels, in %."""
    iou = iou_per_class(conf)[scored]
    acc = conf.diagonal().sum() / conf.sum().clamp(min=1)
    return {"mIoU": round(100 * iou.nanmean().item(), 2), "aAcc": round(100 * acc.item(), 2)}


def export(model: DiGSeg, class_embeds, clip_text, args, label_names, class_ids, background: int) -> None:
    """RUN/model: the trained parameters, the empty prompt's context and the class embeddings; config.json
    names the frozen SD and CLIP (the demo's random CLIP text tower goes into the tensors)."""
    tensors = {f"digseg.{k}": v for k, v in trained_tensors(model).items()} | {"null_context": model.null_context, "class_embeds": class_embeds}
    tensors |= {f"clip_text.{k}": v for k, v in clip_text.state_dict().items()} if args.demo else {}
    config = dict(recipe="digseg", model=args.model, clip=args.clip, class_names=list(label_names), class_ids=class_ids.tolist(), background=background, resize={"square": args.size})
    save_export(args.out / "model", config, tensors, args=args)


def load_trained(run, device=None, classes=None) -> Predictor:
    """A trained run (or its model/ folder) -> predictor(image) -> class ids [H, W] at the image's size;
    `classes`: your own names instead (open vocabulary, through the training's text path): output
    i + 1 is classes[i], 0 where no class reaches τ. The demo predicts every class (no CLIP vision tower)."""
    device, (folder, config, tensors) = default_device(device), read_export(run, "digseg")
    args = argparse.Namespace(**config["args"])
    sd = demo_sd(getattr(args, "random_demo_model", True), prediction_type=args.prediction_type) if args.demo else load_sd(config["model"], components=["unet", "vae"], prediction_type=args.prediction_type)
    embeds, null = tensors.pop("class_embeds").to(device), tensors.pop("null_context")
    model = load_tensors(DiGSeg(sd.unet.widen_conv_in(8), embeds.shape[1], null), tensors, str(folder), "digseg.", partial=args.trainable == "paper").to(device).eval()
    vae, schedule, (e, s), size = sd.vae.to(device).eval(), sd.schedule.to(device), (args.ensemble, args.ddim_steps), (args.size,) * 2
    class_ids, background, names, tau = torch.tensor(config["class_ids"], device=device), config["background"], config["class_names"], args.threshold if args.demo else None
    if classes:
        if args.target == "label-map":
            raise InputError("--classes needs a model trained with --target class-masks (a label-map model takes no prompts)")
        text = load_tensors(CLIPTextEncoderWithProjection(TINY_SD1_TEXT, projection_dim=32), tensors, "", "clip_text.") if args.demo else load_clip(config["clip"])[0]
        embeds, class_ids, background, names, tau = class_embeddings(text, classes, device, args.demo), torch.arange(1, len(classes) + 1, device=device), 0, ("(none)", *classes), args.threshold
    clip_vision = load_clip(config["clip"])[1].to(device).eval() if args.candidates[0] == "clip" and not args.demo else None
    palette = make_palette(len(class_ids) + 1).to(device) if args.target == "label-map" else None

    @torch.no_grad()
    def segment(image: Tensor) -> Tensor:  # as `evaluate` on a set of this one image
        with evaluation(model, seed=args.seed, device=device):
            x = next(iter(torch.utils.data.DataLoader([image]))).to(device)  # the loader draws from the RNG stream first
            inputs = x if x.shape[-2:] == size else F.interpolate(x, size, mode="bilinear").clamp(-1, 1)
            keep = clip_candidates(clip_vision, x, embeds, CLIP_THRESHOLD, PATCH_THRESHOLD)[0].nonzero()[:, 0] if clip_vision and palette is None else torch.arange(len(class_ids), device=device)
            return segment_batch(model, vae, schedule, inputs, embeds, keep, (e, s), x.shape[-2:], class_ids, background, {"": tau}, palette)[""][0].cpu()

    return Predictor(segment, names, palette_for(len(names), background=bool(args.demo or classes)), untinted=0 if args.demo or classes else None, config=config, modules={"digseg": model, "class_embeds": embeds})


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.predict:
        return predict_files(load_trained(args.run, classes=[c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None), args.predict, args.out)
    job = start_run(
        args,
        demo=f"tiny {'random-weight' if args.random_demo_model else 'pre-trained'} SD-structured U-Net and text encoder, random CLIP towers, a frozen 8x8 block codec in place of SD's VAE, "
        "synthetic scenes with class names as prompts",
        real="--model <SD 2.x> --clip <CLIP ViT-L/14> --data-root <ADEChallengeData2016>",
    )
    device = job.device
    args.cuda_graph = use_cuda_graph(args.cuda_graph, device, "digseg_ade20k.py")  # on a GPU: tested equal to the eager step there

    # ---- data: label vocabulary, training and test sets
    if args.demo:
        from unet_seg.data.synthetic import CLASS_NAMES, SemanticScenes, fold_split

        classes = fold_split(0)[1]  # five classes, one per form: "striped disc", "checkered ring", ...
        names, class_ids = [CLASS_NAMES[c] for c in classes], torch.tensor(classes)
        vocab, label_names = (len(CLASS_NAMES), 0, 0), CLASS_NAMES  # background 0 (the majority)
        kw = dict(size=args.size, classes=classes, objects=(2, 3), distinct=True)  # note 7: masks depend on the prompt
        train_data, test_data = SemanticScenes(args.seed, 100_000, **kw), SemanticScenes(args.seed + 1, args.eval_items, **kw)
        scored = [0, *classes]
    else:
        from unet_seg.data.ade20k import ADE20K, ADE20K_CLASSES
        from unet_seg.data.transforms import RandomResizeCropFlip

        names, class_ids = ADE20K_CLASSES, torch.arange(len(ADE20K_CLASSES))
        vocab, label_names = (len(names) + 1, len(names), 0), (*names, "(below τ)")  # majority: wall
        augment = RandomResizeCropFlip((args.size,) * 2, (args.size,) * 2, ratio_range=(0.8, 1.2), keep_ratio=False)  # §4.1
        train_data = ADE20K(args.data_root, "training", transform=augment, seed=args.seed)
        test_data = ADE20K(args.data_root, "validation")
        test_data = head(test_data, args.eval_items) if args.eval_items else test_data
        scored = list(range(len(names)))

    # ---- models: SD U-Net (conv_in 4 -> 8) + text MLP; frozen VAE, SD text encoder (empty prompt), CLIP
    with same_init_on_every_rank(args.seed):
        if args.demo:
            sd = demo_sd(args.random_demo_model, prediction_type=args.prediction_type)
            clip_text, clip_vision = CLIPTextEncoderWithProjection(TINY_SD1_TEXT, projection_dim=32), CLIPVisionEncoder(TINY_VIT)
        else:
            sd = load_sd(args.model, vae_dtype=torch.float32, prediction_type=args.prediction_type)
            clip_text, clip_vision = load_clip(args.clip)
    unet, vae, schedule = sd.unet, sd.vae, sd.schedule.to(device)  # on the device: a CUDA graph cannot copy it there
    sd.text_encoder.to(device).eval()
    null_context = sd.encode_prompt([""])  # [1, 77, D]
    class_embeds = class_embeddings(clip_text, names, device, args.demo)  # [C, P], cached (A.3)
    sd, clip_text = None, clip_text if args.demo else None  # the demo's random tower goes into the export
    clip_vision = clip_vision.to(device).eval() if "clip" in args.candidates else None
    with same_init_on_every_rank(args.seed):  # then each rank its own timesteps, noise and class picks
        model = DiGSeg(unet.widen_conv_in(8), class_embeds.shape[1], null_context).to(device).train()
    vae.to(device).eval().requires_grad_(False)
    if device.type == "cuda":  # NHWC convolutions (benchmarks/NOTES.md)
        model.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    params = set_trainable(model, args.trainable)
    print0(f"training {sum(p.numel() for p in params) / 1e6:.2f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
           f"parameters ({args.trainable}); {schedule.prediction_type} objective; {len(names)} classes")
    lr = torch.tensor(args.lr, device=device) if args.cuda_graph else args.lr  # a graph reads its lr from the GPU
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, fused=True, capturable=args.cuda_graph)

    models = {"digseg": model}
    step = resume_latest(args.out, models, optimizer=opt, steps=args.steps) if args.resume else 0
    if args.export:
        load_checkpoint_for_export(args.out, args.export, models)
        return export(model, class_embeds, clip_text, args, label_names, class_ids, vocab[1])
    forward = wrap_for_training(model, compile=args.compile)
    if args.compile and not args.demo:
        vae.encoder.compile()
        vae.decoder.compile()
    settings = [(1, 1), (args.ensemble, args.ddim_steps)] if args.demo else [(args.ensemble, args.ddim_steps)]
    settings = list(dict.fromkeys(settings))
    palette = make_palette(len(class_ids) + 1).to(device) if args.target == "label-map" else None  # note 8
    eval_kw = dict(vae=vae, schedule=schedule, class_embeds=class_embeds, class_ids=class_ids, vocab=vocab, size=args.size,
                   device=device, seed=args.seed, clip_vision=clip_vision, threshold=args.threshold, palette=palette)  # fmt: skip

    # ---- train: eq. 6 on (image, class) pairs
    loader = resumable_loader(train_data, args.batch_size, args.seed, num_workers=args.workers)

    train = functools.partial(train_step, forward, params, vae, schedule, opt)

    def one_step(batch) -> torch.Tensor:
        z_y, embeds = target_latents(vae, batch["label"], class_embeds, class_ids, palette)
        return check_finite_everywhere(train(batch["image"].to(device), z_y, embeds, *draw_noise(z_y, schedule)), "DiGSeg loss")

    sanity_check(args, out=args.out, step=step, loader=loader, train=one_step, models=models, optimizer=opt, targets={"ADE20K": test_data},
                 evaluate=lambda data: evaluate(model, data, **eval_kw, settings=settings, modes=args.candidates, control=args.demo and palette is None))  # fmt: skip
    if args.cuda_graph:  # captured after the sanity check, which reloads the optimiser state a graph would hold
        train = CudaGraphStep(train, [forward], opt)
    bar = progress(total=args.steps, initial=step, desc="DiGSeg")
    for step, epoch, batch in training_batches(loader, step, args.steps):
        loss = one_step(batch)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if should_checkpoint(step, args.save_every, args.steps):
            save_checkpoint(args.out, step, models, optimizer=opt, epoch=epoch, extra={"args": str(vars(args))}, keep_last=2, final=args.demo and step == args.steps)
        if args.val_every and step % args.val_every == 0 and step < args.steps:
            quick = head(test_data, args.val_items)
            conf, _, _ = evaluate(model, quick, **eval_kw, settings=settings[:1], modes=args.candidates[:1])
            miou = summarise(next(iter(conf.values())), scored)["mIoU"]
            print0(f"step {step}: mIoU {miou:.2f} on {len(quick)} test images ({settings[0][0]}x{settings[0][1]})")
    bar.close()
    if args.cuda_graph:
        train.close()  # before the process group goes: a live graph holding NCCL calls hangs destroy_process_group
    train_time = time.perf_counter() - job.started
    export(model, class_embeds, clip_text, args, label_names, class_ids, vocab[1])

    # ---- eval: E×S settings × candidates × {argmax, τ floor}, the majority baseline, (demo) the shuffled-prompt control
    conf, speed, shown = evaluate(model, test_data, **eval_kw, settings=settings, modes=args.candidates, control=args.demo and palette is None)
    metrics = {n: {**summarise(c, scored), **speed.get(n, {})} for n, c in conf.items()}
    first = next(iter(conf))  # demo: only the scene classes and background are ever predicted
    kept = scored if args.demo else list(range(len(label_names)))
    print0(iou_table(conf[first][kept][:, kept], [label_names[c] for c in kept], title=f"{first}: IoU per class"))
    if shown:
        shift = 0 if args.demo else 1  # ADE20K's class 0 (wall) gets a colour: overlay leaves label 0 untinted
        draw = lambda x, lab: overlay(x, torch.where(lab == 255, 255, lab + shift).cpu(), alpha=0.6)  # noqa: E731
        rows = [[image_to_uint8(x), draw(x, p), draw(x, y)] for x, p, y in shown]
        save_grid(rows, args.out / "predictions.png", titles=["image", "prediction", "ground truth"], scale=2 if args.demo else 1)
    title = f"DiGSeg, {len(test_data)} test images" + (" (DEMO: synthetic)" if args.demo else " (ADE20K-150 val)")
    return finish_run(job, metrics, out=args.out, title=title, wrote="predictions.png", train_seconds=train_time)


if __name__ == "__main__":
    run(main)
