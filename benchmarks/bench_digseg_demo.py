"""How many training steps until the DiGSeg demo (recipes/digseg_ade20k.py --demo) reads its prompts.

    python benchmarks/bench_digseg_demo.py --seconds 120 --out results.md          # CUDA; the recipe's demo model
    python benchmarks/bench_digseg_demo.py --pretrain 400 --seconds 60             # after a captioned pre-training
    python benchmarks/bench_digseg_demo.py --device cpu --seconds 5 --every 2 --eval-items 4   # smoke test

Trains the demo's model as the recipe does (tiny SD2-structured U-Net: random, or with --pretrained
the packaged pre-trained one that the recipe now starts from, all parameters, lr --lr,
batch --batch, --size (128²), the demo's scenes of 2–3 objects of distinct classes among five, ε unless
--pred) for --seconds, and every --every steps evaluates on --eval-items held-out scenes, with each
class's own prompt and with the next class's (the recipe's control):
  mIoU      E×S = 1×10, τ = 0.7 floor (the demo's row)
  own/other mean p_c over the pixels of class c / of the scene's other objects (sampled runs)
  tf900     the same from one x0 prediction at t = 900 given the true noised mask latent, and
            "mean abs dp", the mean absolute change of that p when the prompt is replaced: 0 = not read.
  gain      how much the denoiser's output (t = 900) moves per unit-norm random change of a
            cross-attention output: "gain class" averaged over the layers that see the class
            tokens (latent/4, /8), "gain full" over those at full latent resolution.
Diagnostic variants (not recipe options): --token-norm LayerNorm on each class token (CLIP-like
scale); --context full: the class-token layers also attend to the empty prompt; --class-layers
all: every cross-attention layer sees the class tokens (full resolution too), not A.2's latent/4 and /8; --pretrain N:
first N steps of `unet_seg.demo.pretrain_denoiser` with captions naming the classes present, a
stand-in for SD's text-conditioned pre-training (as DIFF's demo). One JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import load_recipe  # noqa: E402

from unet_seg.attention import context_slice_procs, cross_attention_layers  # noqa: E402
from unet_seg.codecs import latent_to_probability, mask_to_latent  # noqa: E402
from unet_seg.data.synthetic import CLASS_NAMES, SemanticScenes, fold_split  # noqa: E402
from unet_seg.demo import pretrain_denoiser, pretrained_tiny_sd, tiny_sd  # noqa: E402
from unet_seg.diffusion import q_sample, x0_and_eps  # noqa: E402
from unet_seg.metrics import confusion_matrix, iou_per_class  # noqa: E402
from unet_seg.models import TINY_SD1_TEXT  # noqa: E402
from unet_seg.models.clip import CLIPTextEncoderWithProjection  # noqa: E402
from unet_seg.segmentation import candidates_to_labels, denoise_class_masks  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--eval-items", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="the demo's; the paper's is 1e-4")
    p.add_argument("--size", type=int, default=128, help="the demo's")
    p.add_argument("--pred", default="epsilon", choices=("epsilon", "v_prediction"))
    p.add_argument("--token-norm", action="store_true")
    p.add_argument("--context", default="class", choices=("class", "full"))
    p.add_argument("--class-layers", default="paper", choices=("paper", "all"), help="cross-attention layers that see the class tokens")
    p.add_argument("--pretrain", type=int, default=0)
    p.add_argument("--pretrained", action="store_true", help="start from the packaged pre-trained demo SD (the recipe's default)")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", default="run")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    dev, R = torch.device(a.device), load_recipe("digseg_ade20k")
    classes = fold_split(0)[1]
    kw = dict(size=a.size, classes=classes, objects=(2, 3), distinct=True)  # the recipe's demo scenes
    train, test = SemanticScenes(0, 10**6, **kw), SemanticScenes(1, a.eval_items, **kw)
    names, class_ids = [CLASS_NAMES[c] for c in classes], torch.tensor(classes, device=dev)
    torch.manual_seed(0)
    sd = pretrained_tiny_sd(a.pred) if a.pretrained else tiny_sd(prediction_type=a.pred)
    clip_text = CLIPTextEncoderWithProjection(TINY_SD1_TEXT, projection_dim=32)
    null = sd.encode_prompt([""])
    emb = R.class_embeddings(clip_text, names, torch.device("cpu"), demo=True).to(dev)  # whitened, as the recipe's demo
    if a.pretrain:
        sd.text_encoder.to(dev).eval()

        @torch.no_grad()
        def captions(labels):
            present = [", ".join(CLASS_NAMES[c] for c in y.unique().tolist() if 0 < c < 255) for y in labels]
            return sd.text_encoder(sd.tokenizer(present).to(dev))

        start = time.time()
        loss = pretrain_denoiser(sd.unet.to(dev), sd.vae, sd.schedule, a.pretrain, a.size, 0, captions, batch_size=16, device=dev)
        print(a.tag, f"pre-trained {a.pretrain} steps in {time.time() - start:.0f} s, loss {loss:.4f}", flush=True)
        sd.unet.cpu().requires_grad_(True)
    torch.manual_seed(0)
    model = R.DiGSeg(sd.unet.widen_conv_in(8), emb.shape[1], null)
    if a.token_norm:
        d = model.unet.config.context_dim
        model.text_mlp = nn.Sequential(model.text_mlp, nn.Unflatten(-1, (model.tokens, d)), nn.LayerNorm(d), nn.Flatten(-2))
    if a.context == "full":
        model.procs.update(context_slice_procs(R.class_token_layers(model.unet.attention_names), 0, null.shape[1] + model.tokens))
    if a.class_layers == "all":
        start = null.shape[1]
        model.procs.update(context_slice_procs(cross_attention_layers(model.unet.attention_names), start, start + model.tokens))
    model = model.to(dev).train()
    vae, schedule = sd.vae.to(dev), sd.schedule.to(dev)
    params = R.set_trainable(model, "all")
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, fused=True)
    items = [test[i] for i in range(a.eval_items)]
    images, labels = (torch.stack([x[k] for x in items]).to(dev) for k in ("image", "label"))
    gt, objects = torch.stack([labels == c for c in classes], 1), (labels > 0)[:, None]
    mean_p = lambda prob, where: round(((prob * where).sum() / where.sum().clamp(min=1)).item(), 3)  # noqa: E731

    def path_gains(z_x) -> dict:
        """Output change per unit-norm perturbation of each cross-attention output, by level."""
        levels = {"class": ("down_blocks.2.", "mid_block.", "up_blocks.1."), "full": ("down_blocks.0.", "up_blocks.3.")}
        t, y = torch.full((len(z_x),), 900, device=dev), torch.randn(z_x.shape, generator=torch.Generator().manual_seed(7)).to(dev)
        base, gains = model(y, z_x, t, emb[:1].expand(len(z_x), -1)), {}
        for level, prefixes in levels.items():
            change = []
            for name, module in model.unet.named_modules():
                if name.endswith("attn2") and name.startswith(prefixes):
                    def nudge(mod, inp, out):
                        return out + torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(out) / out.numel() ** 0.5
                    handle = module.register_forward_hook(nudge)
                    change.append((model(y, z_x, t, emb[:1].expand(len(z_x), -1)) - base).norm().item())
                    handle.remove()
            gains[f"gain {level}"] = round(sum(change) / len(change), 5)
        return gains

    @torch.no_grad()
    def evaluate(step: int, seconds: float) -> dict:
        model.eval()
        state = torch.random.get_rng_state(), (torch.cuda.get_rng_state() if dev.type == "cuda" else None)
        torch.manual_seed(123)
        row, z_x, forced = {"step": step, "train s": round(seconds)}, vae.encode(images), {}
        for name, prompts in (("prompt", emb), ("control", emb.roll(-1, 0))):
            prob = torch.cat([denoise_class_masks(model, vae, schedule, images[i : i + 16], prompts, 1, 10) for i in range(0, len(images), 16)])
            pred = candidates_to_labels(prob, torch.arange(len(classes), device=dev), class_ids, 0, 0.7)
            keep = [0, *classes]
            row[f"mIoU {name}"] = round(100 * iou_per_class(confusion_matrix(pred, labels, 21)[keep][:, keep]).nanmean().item(), 1)
            row[f"own {name}"], row[f"other {name}"] = mean_p(prob, gt), mean_p(prob, objects & ~gt)
            probs = []
            for k, c in enumerate(classes):
                z_y = mask_to_latent(vae, (labels == c).long())
                noise = torch.randn(z_y.shape, generator=torch.Generator().manual_seed(k)).to(dev)
                t = torch.full((len(z_y),), 900, device=dev)
                y_t = q_sample(z_y, noise, t, schedule)
                x0, _ = x0_and_eps(model(y_t, z_x, t, prompts[k].expand(len(z_y), -1)), y_t, t, schedule)
                probs.append(latent_to_probability(vae, x0))
            forced[name] = torch.stack(probs, 1)
            row[f"tf900 own {name}"], row[f"tf900 other {name}"] = mean_p(forced[name], gt), mean_p(forced[name], objects & ~gt)
        row["tf900 mean abs dp"] = round((forced["prompt"] - forced["control"]).abs().mean().item(), 4)
        row.update(path_gains(z_x[:8]))
        torch.random.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])
        model.train()
        print(a.tag, json.dumps(row, ensure_ascii=False), flush=True)
        return row

    loader = torch.utils.data.DataLoader(train, batch_size=a.batch, shuffle=True, generator=torch.Generator().manual_seed(0),
                                         num_workers=a.workers, persistent_workers=a.workers > 0)  # fmt: skip
    rows, step, seconds, start = [evaluate(0, 0.0)], 0, 0.0, time.time()
    for batch in loader:
        z_y, cond = R.target_latents(vae, batch["label"], emb, class_ids)  # picks from the CPU labels
        R.train_step(model, params, vae, schedule, opt, batch["image"].to(dev), z_y, cond, *R.draw_noise(z_y, schedule))
        step += 1
        if step % a.every == 0:
            seconds += time.time() - start
            rows.append(evaluate(step, seconds))
            start = time.time()
        if seconds + time.time() - start > a.seconds:
            break
    if a.out and rows:
        head = list(rows[0])
        lines = [f"{a.tag}: {vars(a)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]
        a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
