"""Pre-train the demos' tiny text-to-image SD and write its weights (what `unet_seg.demo.pretrained_tiny_sd` loads).

    python -m unet_seg.demo_pretrain --cuda-graph                      # the shipped weights: one H100, 7.5 minutes
    python -m unet_seg.demo_pretrain --steps 20 --device cpu --out /tmp/x.safetensors   # a smoke run

A `DEMO_UNET` U-Net and a `DEMO_TEXT` text encoder, both from scratch, trained together as a
latent text-to-image model: ε-MSE (SD's schedule, t ~ U{0..999}) on `BlockCodec` latents of
`synthetic.CaptionedScenes` (1–4 objects of the 20 classes in random looks, captions naming each
object's colour, class and position and the background's colour; 10% of captions dropped to ""
for classifier-free guidance). Batches alternate between 64² and 128² scenes (the demos' sizes).
Rendering a scene costs the host ≈ 20 ms (the scene ≈ 70%, its caption ≈ 20%, tokenising 5%), so
a GPU waits for the DataLoader: with `--reuse R` a fresh batch enters a buffer of the last
`--buffer` scenes of its size (codec latents and token ids, on the device) every R steps and is
trained on; the other steps train on a batch drawn from that buffer, so the host renders R times
fewer scenes per step (the default 12 kept an H100 waiting 0-2% of the time); `--reuse 1` trains
on every scene once. `--cuda-graph` replays the step (forward, backward, AdamW, moving average)
as one CUDA graph per scene size, so the host no longer launches its ~2600 operations either.
AdamW, linear warm-up then a constant rate, bf16 autocast on a GPU, gradient-norm clip 1; the
shipped weights are an exponential moving average (fp16). Every random number comes from
`--seed`: the scenes are pure functions of (seed, index) and read in order, the initialisation
and the noise from seeded generators. It prints its training curve, then the text-use check:
the denoising loss on held-out scenes with their own captions against the captions of other
scenes (the same noise and timesteps), and writes the weights atomically, with the commit and the
settings in the file's metadata.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .data.synthetic import CaptionedScenes
from .demo import DEMO_TEXT, DEMO_UNET, DEMO_WEIGHTS, BlockCodec, demo_tokenizer, denoising_loss, sample
from .diffusion import NoiseSchedule, q_sample, training_target
from .files import atomic_path
from .models import CLIPTextEncoder, UNet
from .sd import StableDiffusion
from .train.step import CudaGraphStep, backward_and_step
from .viz import image_to_uint8, save_grid

HELD_OUT_SEED = 10**6  # scenes of the text-use check (and the test): never trained on
CHECK_TIMESTEPS = (100, 300, 500, 700, 900)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=20808, help="the shipped run's: 440 s on one H100 with --cuda-graph")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999, help="decay of the weights' moving average (what is shipped)")
    p.add_argument("--drop-caption", type=float, default=0.1, help="probability of an empty caption")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="scene sides, alternating batch by batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=14, help="DataLoader processes rendering scenes")
    p.add_argument("--reuse", type=int, default=12, help="a fresh batch every R steps, the others drawn from the buffer "
                   "of recent scenes: the host renders R times fewer scenes per step")
    p.add_argument("--cuda-graph", action="store_true", help="replay each training step (forward, backward, AdamW, "
                   "moving average) as one CUDA graph: the host no longer launches its ~2600 operations")
    p.add_argument("--buffer", type=int, default=32768, help="recent scenes kept per size for --reuse (latents and ids on the device)")
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


class MixedSizes(torch.utils.data.Dataset):
    """Item i -> a `CaptionedScenes(seed)` scene of side sizes[(i // batch) % len(sizes)] and its
    caption's token ids (or an empty caption's, with probability `drop`, from the item's own
    generator): every batch is one size."""

    def __init__(self, seed: int, length: int, sizes, batch: int, drop: float):
        self.sets = [CaptionedScenes(seed, length, s) for s in sizes]
        self.batch, self.drop, self.seed = batch, drop, seed
        self.tokenizer = demo_tokenizer()

    def __len__(self) -> int:
        return len(self.sets[0])

    def __getitem__(self, i: int) -> dict:
        item = self.sets[(i // self.batch) % len(self.sets)][i]
        dropped = float(torch.rand((), generator=torch.Generator().manual_seed(self.seed * 10**9 + i))) < self.drop
        return {"image": item["image"], "ids": self.tokenizer("" if dropped else item["caption"])[0]}


class SceneBuffer:
    """The last `capacity` scenes of one size as (codec latents [N, 4, h, w], token ids [N, 77]) on
    their device: `add` a fresh batch (oldest overwritten), `sample` a batch uniformly. No host sync."""

    def __init__(self, capacity: int):
        self.capacity, self.count, self.next = capacity, 0, 0
        self.z = self.ids = None

    def add(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        if self.z is None:
            self.z = z.new_empty(self.capacity, *z.shape[1:])
            self.ids = ids.new_empty(self.capacity, *ids.shape[1:])
        slots = (self.next + torch.arange(len(z), device=z.device)) % self.capacity
        self.z[slots], self.ids[slots] = z, ids
        self.next, self.count = (self.next + len(z)) % self.capacity, min(self.count + len(z), self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(self.count, (n,), generator=generator, device=self.z.device)
        return self.z[i], self.ids[i]


def fresh_step(step: int, sizes: int, reuse: int) -> bool:
    """Whether `step` trains on a fresh batch: the first `sizes` steps (one batch of each size) of
    every `reuse` × `sizes`, so the fresh batches keep alternating sizes as the loader yields them."""
    return (step // sizes) % reuse == 0


class MovingAverage(nn.Module):
    """An exponential moving average of `params` as buffers (so `CudaGraphStep` restores it after
    its warm-up steps, as it does the weights)."""

    def __init__(self, params, decay: float):
        super().__init__()
        self.decay = decay
        for i, p in enumerate(params):
            self.register_buffer(f"p{i}", p.detach().clone())

    @torch.no_grad()
    def update(self, params) -> None:
        torch._foreach_lerp_(list(self.buffers()), [p.detach() for p in params], 1 - self.decay)


def train_step(unet, text_encoder, ema: MovingAverage, opt, schedule, z0, ids, t, noise) -> torch.Tensor:
    """One step of the ε objective on latents z0 [B, 4, h, w] with captions `ids` [B, 77] at
    timesteps t [B] with `noise` -> the loss. No host sync: a CUDA graph can hold it, and a
    non-finite loss skips the update on the device (the loop raises when it reads the loss)."""
    params = [*unet.parameters(), *text_encoder.parameters()]
    with torch.autocast(z0.device.type, torch.bfloat16, enabled=z0.device.type == "cuda"):
        pred = unet(q_sample(z0, noise, t, schedule), t, text_encoder(ids))
    loss = F.mse_loss(pred.float(), training_target(z0, noise, t, schedule))
    backward_and_step(opt, params, loss, max_norm=1.0)
    ema.update(params)
    return loss


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
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit(f"demo_pretrain: --cuda-graph needs a CUDA device, this run has {device}")
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = MovingAverage(params, args.ema)
    print(f"demo SD: U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, text encoder "
          f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M parameters; {args.steps} steps of "
          f"{args.batch_size} scenes at {args.sizes} on {device}; commit {commit}", flush=True)  # fmt: skip
    lr = torch.tensor(args.lr, device=device) if args.cuda_graph else args.lr  # a graph reads the schedule's lr from the GPU
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True, capturable=args.cuda_graph)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup))
    if args.reuse < 1 or args.buffer < args.batch_size:
        raise SystemExit(f"demo_pretrain: --reuse must be >= 1 and --buffer >= --batch-size, got {args.reuse} and {args.buffer}")
    fresh = sum(fresh_step(s, len(args.sizes), args.reuse) for s in range(args.steps))
    data = MixedSizes(args.seed, fresh * args.batch_size, args.sizes, args.batch_size, args.drop_caption)
    loader = torch.utils.data.DataLoader(
        data, args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0, prefetch_factor=8 if args.workers else None,
    )  # fmt: skip
    g = torch.Generator(device).manual_seed(args.seed + 1)
    picks = torch.Generator(device).manual_seed(args.seed + 2)  # --reuse's draws: g's stream stays --reuse 1's
    buffers = {size: SceneBuffer(args.buffer) for size in args.sizes}
    unet.train()
    text_encoder.train()
    step_fn = functools.partial(train_step, unet, text_encoder, ema, opt, schedule)
    if args.cuda_graph:  # one graph per scene size
        step_fn = CudaGraphStep(step_fn, [unet, text_encoder, ema], opt)
    start, window, curve, batches, waited = time.perf_counter(), [], [], iter(loader), 0.0
    for step in range(args.steps):
        buffer = buffers[args.sizes[step % len(args.sizes)]]
        if fresh_step(step, len(args.sizes), args.reuse):
            asked = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - asked  # the host waiting for rendered scenes
            ids = batch["ids"].to(device, non_blocking=True)
            with torch.no_grad():
                z0 = codec.encode(batch["image"].to(device, non_blocking=True))
            if args.reuse > 1:
                buffer.add(z0, ids)
        else:
            z0, ids = buffer.sample(args.batch_size, picks)
        t = torch.randint(0, schedule.num_train_timesteps, (len(z0),), generator=g, device=device)
        noise = torch.randn(z0.shape, generator=g, device=device)
        window.append(step_fn(z0, ids, t, noise).detach().clone())  # a graph's output is overwritten by its next replay
        sched.step()
        out_of_time = args.max_seconds and time.perf_counter() - start > args.max_seconds
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps or out_of_time:
            mean = torch.stack(window).mean().item()
            if not math.isfinite(mean):
                raise FloatingPointError(f"non-finite training loss at step {step + 1}")
            seconds = time.perf_counter() - start
            curve.append((step + 1, round(mean, 5)))
            print(f"step {step + 1:6d}  loss {mean:.4f}  lr {float(sched.get_last_lr()[0]):.2e}  {seconds:7.1f} s  "
                  f"{(step + 1) / seconds:5.1f} steps/s  waiting for scenes {waited / seconds:4.0%}", flush=True)  # fmt: skip
            window = []
        if out_of_time:
            print(f"stopped by --max-seconds after {step + 1} steps", flush=True)
            break
    args.steps = step + 1
    train_seconds = time.perf_counter() - start

    if args.cuda_graph:
        step_fn.close()
    with torch.no_grad():
        for p, e in zip(params, ema.buffers()):
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

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "commit", "device", "workers", "picture", "max_seconds", "cuda_graph")}
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
