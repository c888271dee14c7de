"""Pre-train the demos' tiny text-to-image SD and write its weights (what `unet_seg.demo.pretrained_tiny_sd` loads).

    python -m unet_seg.demo_pretrain --max-seconds 260                 # one GPU (an H200: 4.5 minutes)
    python -m unet_seg.demo_pretrain --steps 20 --device cpu --out /tmp/x.safetensors   # a smoke run

A `DEMO_UNET` U-Net and a `DEMO_TEXT` text encoder, both from scratch, trained together as a
latent text-to-image model: ε-MSE (SD's schedule, t ~ U{0..999}) on `BlockCodec` latents of
captioned synthetic scenes rendered on the device (`SceneBatches`: `synthetic.CaptionedScenes`'s
distribution; 1–4 objects of the 20 classes in random looks, captions naming each
object's colour, class and position and the background's colour; 10% of captions dropped to ""
for classifier-free guidance). Batches alternate between 64² and 128² scenes (the demos' sizes).
AdamW, linear warm-up then a constant rate, bf16 autocast on a GPU, gradient-norm clip 1; the
shipped weights are an exponential moving average (fp16). Every random number comes from
`--seed` (the initialisation, the scenes, the noise: seeded generators). It prints its training curve, then the text-use check:
the denoising loss on held-out scenes with their own captions against the captions of other
scenes (the same noise and timesteps), and writes the weights atomically, with the commit and the
settings in the file's metadata.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .data import synthetic
from .data.synthetic import CaptionedScenes
from .demo import DEMO_TEXT, DEMO_UNET, DEMO_WEIGHTS, BlockCodec, demo_tokenizer, denoising_loss, sample
from .diffusion import NoiseSchedule, q_sample, training_target
from .hub import atomic_path
from .models import CLIPTextEncoder, UNet
from .sd import StableDiffusion
from .viz import image_to_uint8, save_grid

HELD_OUT_SEED = 10**6  # scenes of the text-use check (and the test): never trained on
CHECK_TIMESTEPS = (100, 300, 500, 700, 900)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999, help="decay of the weights' moving average (what is shipped)")
    p.add_argument("--drop-caption", type=float, default=0.1, help="probability of an empty caption")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="scene sides, alternating batch by batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-seconds", type=float, default=0, help="stop training after this many seconds (0: never); "
                   "the metadata records the steps done")
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--check-scenes", type=int, default=256, help="held-out scenes of the text-use check")
    p.add_argument("--out", type=Path, default=DEMO_WEIGHTS)
    p.add_argument("--picture", type=Path, help="also write a PNG: held-out scenes, what the codec keeps of them, "
                   "and samples from their captions")
    p.add_argument("--commit", help="the commit recorded in the metadata (default: git rev-parse HEAD)")
    return p.parse_args(argv)


class SceneBatches:
    """Captioned scenes rendered on the device, a batch at a time: the distribution of
    captioned synthetic scenes rendered on the device (`SceneBatches`: `synthetic.CaptionedScenes`'s
distribution; 1–4 objects of distinct classes among the 20, the same
    background, forms, textures and `random_style` looks, a quarter in `CLEAN_STYLE`, captions as
    `synthetic.describe` words them) drawn from one device generator instead of per-item CPU
    streams (a CPU renders about 750 scenes/s on 14 processes: 6 steps/s; the GPU many times that).

        next(size) -> images [B, 3, size, size] in [-1, 1], token ids [B, 77] (`drop`: "" instead)
    """

    def __init__(self, batch: int, seed: int, device: torch.device, drop: float):
        self.batch, self.device, self.drop = batch, device, drop
        self.g = torch.Generator(device).manual_seed(seed)
        self.tokenizer = demo_tokenizer()
        self.word_ids: dict[str, list[int]] = {}
        self.form_texture = torch.tensor(synthetic._FORM_TEXTURE, device=device)  # [20, 2]
        self.clean = torch.tensor(synthetic.CLEAN_STYLE.colour_matrix, device=device)

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.g, device=self.device)

    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.g, device=self.device)

    @torch.no_grad()
    def render(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (images [B, 3, S, S], labels [B, S, S]) as `synthetic.scene` paints them, batched."""
        n, s = self.batch, size
        y = (torch.arange(s, device=self.device, dtype=torch.float32) + 0.5).view(1, 1, s, 1)
        x = y.view(1, 1, 1, s)
        # background: gradient + 4×4 bilinear noise + 3 thin lines
        base, slope, direction = self.rand(n, 3, 1, 1) * 1.2 - 0.6, self.rand(n, 3, 1, 1) * 0.7 - 0.35, self.rand(n, 1, 1, 1) * 2 * math.pi
        ramp = ((x / s) * 2 - 1) * torch.cos(direction) + ((y / s) * 2 - 1) * torch.sin(direction)
        image = base + slope * ramp + F.interpolate(0.2 * self.randn(n, 3, 4, 4), size=(s, s), mode="bilinear")
        ends, half_width, colours = self.rand(n, 3, 4) * s, (0.008 + 0.012 * self.rand(n, 3, 1, 1)) * s, self.rand(n, 3, 3) * 2 - 1
        p0y, p0x, p1y, p1x = (ends[:, :, i, None, None] for i in range(4))  # [n, 3 lines, 1, 1]
        dy, dx = p1y - p0y, p1x - p0x
        t = (((y[0] - p0y) * dy + (x[0] - p0x) * dx) / (dy**2 + dx**2 + 1e-6)).clamp(0, 1)
        on_line = (y[0] - p0y - t * dy) ** 2 + (x[0] - p0x - t * dx) ** 2 <= half_width**2  # [n, 3, S, S]
        for i in range(3):
            image = torch.where(on_line[:, i : i + 1], colours[:, i, :, None, None], image)
        # objects: count U{1..4}, distinct classes, painted in order
        grain = self.randn(n, 3, s, s)
        labels = torch.zeros(n, 1, s, s, dtype=torch.long, device=self.device)
        count = 1 + (self.rand(n) * 4).long()
        classes = 1 + self.rand(n, synthetic.NUM_CLASSES).argsort(1)[:, :4]
        for k in range(4):
            c = classes[:, k]
            form, texture = self.form_texture[c - 1].unbind(1)
            p = self.rand(n, 8, 1, 1)
            c0 = self.rand(n, 3, 1, 1) * 1.8 - 0.9
            c1 = (c0 - 1.1 * torch.sign(c0)).clamp(-1, 1)
            radius = (0.13 + 0.09 * p[:, 0:1]) * s
            cy, cx = 0.7 * radius + p[:, 1:2] * (s - 1.4 * radius), 0.7 * radius + p[:, 2:3] * (s - 1.4 * radius)
            dy, dx = y - cy, x - cx
            rot, angle, period = p[:, 3:4] * 2 * math.pi, p[:, 4:5] * math.pi, (0.10 + 0.04 * p[:, 5:6]) * s
            u = (dx * torch.cos(rot) + dy * torch.sin(rot)) / radius
            v = (dy * torch.cos(rot) - dx * torch.sin(rot)) / radius
            a = (dx * torch.cos(angle) + dy * torch.sin(angle)) / period + p[:, 6:7]
            b = (dy * torch.cos(angle) - dx * torch.sin(angle)) / period + p[:, 7:8]
            forms = torch.stack([fn(u, v) for fn in synthetic._FORM_FNS])  # [5, n, 1, S, S]
            paints = torch.stack([fn(a, b, c0, c1, grain).expand(n, 3, s, s) for fn in synthetic._TEXTURE_FNS])
            rows = torch.arange(n, device=self.device)
            inside = forms[form, rows] & (k < count).view(n, 1, 1, 1)
            image = torch.where(inside, paints[texture, rows], image)
            labels = torch.where(inside, c.view(n, 1, 1, 1), labels)
        return self.style(image.clamp(-1, 1)), labels[:, 0]

    def style(self, image: torch.Tensor) -> torch.Tensor:
        """`synthetic._apply_style` with a `random_style` per image (or, p = 0.25, `CLEAN_STYLE`)."""
        n, s = image.shape[0], image.shape[-1]
        clean = (self.rand(n) < 0.25).view(n, 1, 1)
        matrix = torch.where(clean, self.clean, torch.softmax(2 * self.randn(n, 3, 3), -1))
        contrast = torch.where(clean[:, 0], 1.0, 0.5 + 0.6 * self.rand(n, 1)).view(n, 1, 1, 1)
        brightness = torch.where(clean[:, 0], 0.0, 0.4 * self.rand(n, 1) - 0.2).view(n, 1, 1, 1)
        jitter = torch.where(clean[:, 0], 0.05, 0.1).view(n, 1, 1, 1)
        sigma = torch.where(clean[:, 0], 0.0, self.rand(n, 1)).view(n, 1)
        noise_std = torch.where(clean[:, 0], 0.02, 0.08 * self.rand(n, 1)).view(n, 1, 1, 1)
        u = self.rand(2, n, 3, 1, 1) * 2 - 1
        x = contrast * torch.einsum("noc,nchw->nohw", matrix, image) + brightness
        x = x * (1 + jitter * u[0]) + jitter * u[1]
        taps = torch.arange(-2, 3, device=self.device, dtype=torch.float32)
        k = torch.exp(-0.5 * (taps / sigma.clamp_min(1e-3)) ** 2)
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [n·3, 5]; σ ≈ 0: the identity
        x = F.pad(x.reshape(1, n * 3, s, s), (2, 2, 2, 2), mode="reflect")
        x = F.conv2d(x, k.view(n * 3, 1, 1, 5), groups=n * 3)
        x = F.conv2d(x, k.view(n * 3, 1, 5, 1), groups=n * 3).view(n, 3, s, s)
        return (x + noise_std * self.randn(n, 3, s, s)).clamp(-1, 1)

    def captions(self, image: torch.Tensor, labels: torch.Tensor) -> list[str]:
        """`synthetic.describe` of every scene, from per-class sums computed on the device."""
        n, s = labels.shape[0], labels.shape[-1]
        onehot = F.one_hot(labels.view(n, -1), synthetic.NUM_CLASSES + 1).float()  # [n, S², 21]
        area = onehot.sum(1)  # [n, 21]
        grid = (torch.arange(s, device=self.device, dtype=torch.float32) + 0.5) / s
        cy = torch.einsum("npk,p->nk", onehot, grid.repeat_interleave(s)) / area.clamp_min(1)
        cx = torch.einsum("npk,p->nk", onehot, grid.repeat(s)) / area.clamp_min(1)
        colour = torch.einsum("npk,ncp->nkc", onehot, image.view(n, 3, -1)) / area.clamp_min(1)[..., None]
        area, cy, cx, colour = (t.cpu() for t in (area, cy, cx, colour))
        out = []
        for i in range(n):
            objects = [
                (min(int(3 * cy[i, c]), 2), float(cx[i, c]), f"{synthetic.colour_name(colour[i, c])} {synthetic.CLASS_NAMES[c]} "
                 f"at {synthetic.position_name(float(cy[i, c]), float(cx[i, c]))}")
                for c in range(1, synthetic.NUM_CLASSES + 1) if area[i, c] > 0
            ]  # fmt: skip
            back = f"on {synthetic.colour_name(colour[i, 0])} background" if area[i, 0] > 0 else ""
            out.append(" ".join(filter(None, [", ".join(text for _, _, text in sorted(objects)), back])))
        return out

    def ids(self, captions: list[str]) -> torch.Tensor:
        """Token ids [B, 77] of captions, built from cached per-word ids (CLIP's BPE works word by word)."""
        rows = torch.full((len(captions), 77), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, caption in zip(rows, captions):
            ids = [self.tokenizer.bos_token_id]
            for word in caption.replace(",", " ,").split():
                if word not in self.word_ids:
                    self.word_ids[word] = self.tokenizer.tokens(word)
                ids += self.word_ids[word]
            ids = ids[:76] + [self.tokenizer.eos_token_id]
            row[: len(ids)] = torch.tensor(ids)
        return rows

    def next(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.render(size)
        captions = self.captions(images, labels)
        dropped = (self.rand(len(captions)) < self.drop).tolist()
        return images, self.ids(["" if d else c for c, d in zip(captions, dropped)]).to(self.device, non_blocking=True)


def lr_factor(step: int, warmup: int) -> float:
    """Linear warm-up to 1, then constant (the moving average smooths): a run stopped by
    --max-seconds at step N is the run of --steps N."""
    return min((step + 1) / warmup, 1.0)


def commit_of_checkout() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@torch.no_grad()
def text_use(sd: StableDiffusion, scenes: int, size: int) -> dict:
    """Mean denoising loss on `scenes` held-out scenes with their own captions and with the next
    scene's caption (rolled by one), at `CHECK_TIMESTEPS`; the relative margin (other − own) / other."""
    data = CaptionedScenes(HELD_OUT_SEED, scenes, size)
    items = [data[i] for i in range(scenes)]
    images, captions = torch.stack([it["image"] for it in items]), [it["caption"] for it in items]
    own = denoising_loss(sd, images, captions, CHECK_TIMESTEPS).mean().item()
    other = denoising_loss(sd, images, captions[1:] + captions[:1], CHECK_TIMESTEPS).mean().item()
    return {"size": size, "own caption": round(own, 5), "other caption": round(other, 5), "margin": round((other - own) / other, 4)}


@torch.no_grad()
def picture(sd: StableDiffusion, path: Path, scenes: int = 6, size: int = 128) -> list[str]:
    """Rows of [held-out scene, its codec latent decoded, two samples from its caption] -> PNG at
    `path`; returns the captions, row by row."""
    data = CaptionedScenes(HELD_OUT_SEED + 1, scenes, size, clean=1.0)
    items = [data[i] for i in range(scenes)]
    captions = [it["caption"] for it in items]
    images = torch.stack([it["image"] for it in items])
    kept = sd.vae.decode(sd.vae.encode(images)).clamp(-1, 1)
    samples = [sample(sd, captions, size, seed=s).cpu() for s in (0, 1)]
    rows = [[image_to_uint8(x) for x in (images[i], kept[i], samples[0][i], samples[1][i])] for i in range(scenes)]
    save_grid(rows, path, titles=["scene", "codec keeps", "sample 1", "sample 2"])
    return captions


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    commit = args.commit or commit_of_checkout()
    torch.manual_seed(args.seed)
    unet, text_encoder = UNet(DEMO_UNET).to(device), CLIPTextEncoder(DEMO_TEXT).to(device)
    codec, schedule = BlockCodec(), NoiseSchedule.sd("epsilon").to(device)
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in params]
    print(f"demo SD: U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, text encoder "
          f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M parameters; {args.steps} steps of "
          f"{args.batch_size} scenes at {args.sizes} on {device}; commit {commit}", flush=True)  # fmt: skip
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup))
    batches = SceneBatches(args.batch_size, args.seed, device, args.drop_caption)
    g = torch.Generator(device).manual_seed(args.seed + 1)
    unet.train()
    text_encoder.train()
    start, window, curve = time.perf_counter(), [], []
    for step in range(args.steps):
        images, ids = batches.next(args.sizes[step % len(args.sizes)])
        with torch.no_grad():
            z0 = codec.encode(images)
        t = torch.randint(0, schedule.num_train_timesteps, (len(z0),), generator=g, device=device)
        noise = torch.randn(z0.shape, generator=g, device=device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            pred = unet(q_sample(z0, noise, t, schedule), t, text_encoder(ids))
        loss = F.mse_loss(pred.float(), training_target(z0, noise, t, schedule))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - args.ema)
        window.append(loss.detach())
        out_of_time = args.max_seconds and time.perf_counter() - start > args.max_seconds
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps or out_of_time:
            mean = torch.stack(window).mean().item()
            if not math.isfinite(mean):
                raise FloatingPointError(f"non-finite training loss at step {step + 1}")
            seconds = time.perf_counter() - start
            curve.append((step + 1, round(mean, 5)))
            print(f"step {step + 1:6d}  loss {mean:.4f}  lr {sched.get_last_lr()[0]:.2e}  {seconds:7.1f} s  "
                  f"{(step + 1) / seconds:5.1f} steps/s", flush=True)  # fmt: skip
            window = []
        if out_of_time:
            print(f"stopped by --max-seconds after {step + 1} steps", flush=True)
            break
    args.steps = step + 1
    train_seconds = time.perf_counter() - start

    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    sd = StableDiffusion(unet, codec, text_encoder, demo_tokenizer(), schedule, source="training")
    checks = [text_use(sd, args.check_scenes, s) for s in args.sizes]
    for c in checks:
        print(f"text use, {args.check_scenes} held-out scenes at {c['size']}²: loss {c['own caption']:.4f} with their captions, "
              f"{c['other caption']:.4f} with another scene's; margin {100 * c['margin']:.1f}%", flush=True)  # fmt: skip

    if args.picture:
        for i, caption in enumerate(picture(sd, args.picture), 1):
            print(f"picture row {i}: {caption}", flush=True)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "commit", "device", "picture", "max_seconds")}
    metadata = {
        "commit": commit,
        "settings": json.dumps(settings),
        "script": "python -m unet_seg.demo_pretrain",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_seconds": f"{train_seconds:.1f}",
        "curve": json.dumps(curve),
        "text_use": json.dumps(checks),
    }
    weights = {f"unet.{k}": v for k, v in unet.state_dict().items()} | {f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()}
    with atomic_path(args.out) as tmp:
        save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in weights.items()}, str(tmp), metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) after {train_seconds:.0f} s of training", flush=True)
    return {"curve": curve, "checks": checks, "train_seconds": train_seconds}


if __name__ == "__main__":
    main()
