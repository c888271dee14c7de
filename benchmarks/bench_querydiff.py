"""QueryDiff (recipes/querydiff_gta2cs.py) on one GPU: inference speed WITHOUT the diffusion branch.

    python benchmarks/bench_querydiff.py                                    # CUDA, DINOv2-L + Rein, 512² crops, bf16
    python benchmarks/bench_querydiff.py --tiny --device cpu --iters 2      # smoke test (demo model, no timm)

Times the recipe's own `predict_scores` (backbone -> agent queries -> refined Mask2Former
decoder -> semantic scores; the path `evaluate` uses for each sliding window) on random weights
(`timm` builds DINOv2 with `pretrained=False`), eager and `torch.compile`d, under bf16 autocast
with channels_last, as the recipe runs. For scale, the same table times what inference does NOT
run: the training-only diffusion branch (SD2.1 VAE encode + one batched U-Net forward for t_w and
t_s, up to the last tapped layer; `diffusion_features`), eager. A Cityscapes image at the
evaluation scale (1024×512) is 3 sliding windows of 512² (stride 341). Needs timm (`recipes` extra).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_models import device_name, file_tag, load_recipe, timed, write_table  # noqa: E402

from unet_seg.diffusion import NoiseSchedule  # noqa: E402
from unet_seg.models import SD21, SD_VAE, AutoencoderKL, UNet  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the demo's model at 64² (smoke test)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    recipe = load_recipe("querydiff_gta2cs")
    cli = ["--demo"] if args.tiny else ["--eval-only", "--no-pretrained"]
    rargs = recipe.parse_args(cli)
    num_classes = 6 if args.tiny else 19
    model = recipe.build_model(rargs, num_classes, False, []).to(device).eval()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    total = sum(p.numel() for p in model.parameters()) / 1e6
    size = rargs.size
    rows = []
    for batch in map(int, args.batches.split(",")):
        x = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=torch.channels_last)
        for mode in args.modes.split(","):
            torch._dynamo.reset()
            net = torch.compile(model) if mode == "compile" else model
            ms = timed(lambda: recipe.predict_scores(net, x), args.iters, 3, args.device)
            rows.append(("segmentation inference (no diffusion)", batch, mode, ms))
            print(f"inference b{batch} {mode:8s} {ms:8.2f} ms  {1e3 * batch / ms:7.1f} crops/s", flush=True)
        if batch == min(map(int, args.batches.split(","))):
            unet = UNet(recipe.DEMO_TEACHER if args.tiny else SD21).to(device, torch.bfloat16).eval()
            vae = AutoencoderKL(SD_VAE).to(device, torch.bfloat16).eval() if not args.tiny else recipe.BlockCodec()
            context = torch.zeros(1, 77, unet.config.context_dim, device=device, dtype=torch.bfloat16)
            schedule = NoiseSchedule.sd().to(device)

            def branch():
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    return recipe.diffusion_features(unet, vae, context, x, schedule)

            ms = timed(branch, args.iters, 3, args.device)
            rows.append(("diffusion branch (training only): VAE + U-Net at t_w, t_s", batch, "eager", ms))
            print(f"diffusion branch b{batch} eager {ms:8.2f} ms", flush=True)
            del unet, vae
    gpu = device_name(args.device)
    backbone = "tiny conv (demo)" if args.tiny else "DINOv2 ViT-L/16 + Rein (timm, random weights)"
    header = (
        f"# QueryDiff inference without the diffusion branch — {gpu}\n\n"
        f"{datetime.date.today()} · torch {torch.__version__} · bf16 autocast, channels_last · {size}² crops · "
        f"{backbone}, {rargs.queries} agent queries, decoder d {rargs.dim} × {rargs.decoder_layers} layers, {num_classes} classes · "
        f"{total:.0f} M parameters ({trainable:.1f} M trained) · median of {args.iters} calls after 3 warm-ups\n\n"
        "| what | batch | mode | ms | crops/s |\n|---|---|---|---|---|\n"
    )
    lines = [f"| {what} | {b} | {mode} | {ms:.2f} | {1e3 * b / ms:.1f} |" for what, b, mode, ms in rows]
    write_table(header + "\n".join(lines) + "\n", args.out, f"querydiff_{file_tag(gpu)}", args.tiny)


if __name__ == "__main__":
    main()
