"""`python -m unet_seg`: load Stable Diffusion and run its segmentation-relevant path once.

image -> VAE latent -> forward process at t -> one U-Net call -> x0 estimate -> decoded image,
plus the decoder features a segmentation head would read. With no `--model` it builds a tiny
random-weight SD (no download) and says so.
"""

import argparse
import time
from pathlib import Path

from unet_seg.cli import run
from unet_seg.errors import InputError

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m unet_seg", description=__doc__)
    p.add_argument("--model", help="hub repo id, diffusers folder or single .safetensors file (default: tiny random demo)")
    p.add_argument("--image", help="input image (default: a synthetic gradient)")
    p.add_argument("--prompt", default="")
    p.add_argument("--size", type=int, default=None, help="image side, a multiple of 8 (default 512, demo 64)")
    p.add_argument("--t", type=int, default=200, help="forward-process timestep")
    p.add_argument("--out", default="runs/unet_seg_demo.png", help="PNG: input | one-step reconstruction")
    p.add_argument("--device", help="default: cuda where available, else cpu")
    args = p.parse_args(argv)
    if args.size is not None and (args.size < 8 or args.size % 8):
        p.error(f"--size must be a positive multiple of 8 (the VAE's downscale), got {args.size}")
    if not 0 <= args.t < 1000:
        p.error(f"--t must lie in 0..999, got {args.t}")
    if args.image is not None:
        problem = unreadable_image(args.image)
        if problem:
            p.error(f"--image {args.image}: {problem}")
    return args


def unreadable_image(path: str) -> str:
    """Why `path` is not an image (its header, read in milliseconds without torch), or ""."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        return "no such file"
    try:
        with Image.open(path):
            return ""
    except (UnidentifiedImageError, OSError) as e:
        return f"not an image ({e})"


if __name__ == "__main__":
    parse_args()  # usage errors here, before the seconds that importing torch takes

import numpy as np
import torch
from PIL import Image

from unet_seg import StableDiffusion, load_sd
from unet_seg.diffusion import NoiseSchedule, predict_x0, q_sample
from unet_seg.models import TINY_SD1, TINY_SD1_TEXT, TINY_VAE, AutoencoderKL, CLIPTextEncoder, CLIPTokenizer, UNet


def tiny_sd() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion(
        UNet(TINY_SD1).eval(), AutoencoderKL(TINY_VAE).eval(), CLIPTextEncoder(TINY_SD1_TEXT).eval(),
        CLIPTokenizer.from_bpe(), NoiseSchedule.sd(), source="tiny random weights",
    )  # fmt: skip


def load_image(path: str, size: int) -> torch.Tensor:
    try:
        img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    except (OSError, ValueError) as e:  # a header that reads but pixels that do not (a truncated file)
        raise InputError(f"--image {path}: not a readable image ({e})") from None
    return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


def main() -> None:
    args = parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    if args.model is None:
        print("DEMO: tiny random-weight Stable Diffusion built in memory (no download); outputs are noise-like.")
        sd, size = tiny_sd(), args.size or 64
    else:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        start = time.perf_counter()
        sd = load_sd(args.model, dtype=dtype, vae_dtype=torch.float32, device=args.device)
        print(f"loaded {sd.source} in {time.perf_counter() - start:.1f} s {sd.notes}")
        size = args.size or 512
    for model in (sd.unet, sd.vae, sd.text_encoder):
        model.to(args.device)
    img = load_image(args.image, size) if args.image else torch.linspace(-1, 1, size).expand(1, 3, size, size)
    img = img.to(args.device)

    with torch.no_grad():
        context = sd.encode_prompt([args.prompt])
        z0 = sd.vae.encode(img)  # float32, as img: the bf16 U-Net casts in and answers in float32
        t = torch.full((1,), args.t, device=args.device)
        noise = torch.randn(z0.shape, generator=torch.Generator(args.device).manual_seed(0), device=args.device)
        z_t = q_sample(z0, noise, t, sd.schedule)
        x0 = predict_x0(lambda x, tt: sd.unet(x, tt, context), z_t, t, sd.schedule)
        feats = sd.unet.features(z_t, t, context, ["up.1", "up.2"])
        recon = sd.vae.decode(x0)
    print(f"image {tuple(img.shape)} -> latent {tuple(z0.shape)} -> one-step x0 at t={args.t} -> {tuple(recon.shape)}")
    print("decoder features: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in feats.items()))
    pair = torch.cat([img, recon.clamp(-1, 1)], dim=3)[0]
    pixels = ((pair.permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(args.out)
    print(f"wrote {Path(args.out).resolve()}")


if __name__ == "__main__":
    run(main, prog="python -m unet_seg")
