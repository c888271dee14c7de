"""DIFF (recipes/diff_gta2cs.py) on one GPU: inference and IPKL training step at the paper's scale.

    python benchmarks/bench_diff.py                                   # CUDA, SD2.1 + SD VAE, random weights
    python benchmarks/bench_diff.py --tiny --device cpu --iters 1     # smoke test of the script itself

The timed functions are the recipe's own (`predict_logits`, `train_step`) with its real settings:
9 timesteps tapped in one U-Net call, 9 ResNet outputs + 9 cross-attention maps of up levels 1–3,
fusion block (2048/1024/512 → 256) and DAFormer head, U-Net fp32 weights under bf16 autocast,
channels_last. Inference: the unconditional branch on one image, a 512² crop and a whole
Cityscapes frame at 1024×512 (the paper's evaluation). Training: batch 1, a 512² crop whose label
holds two of the five prompted classes, so the U-Net call has 3 prompts × 9 timesteps = 27 rows;
CE + L2 consistency, AdamW. "compile" compiles the U-Net and the fusion + head, as `--compile`.
Prints a markdown table (ms, images/s, TFLOP per image, peak memory) and writes it to `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_models import device_name, file_tag, flops_of, load_recipe, timed, write_table  # noqa: E402

from unet_seg.diffusion import NoiseSchedule  # noqa: E402
from unet_seg.models import SD2_TEXT, SD21, SD_VAE, TINY_SD2, TINY_SD2_TEXT, TINY_VAE, AutoencoderKL, CLIPTextEncoder, UNet  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny configs (smoke test)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    recipe = load_recipe("diff_gta2cs")
    run = recipe.parse_args(["--data-root", "unused"] + (["--timesteps", "91", "30", "7"] if args.tiny else []))

    torch.manual_seed(0)
    unet = UNet(TINY_SD2 if args.tiny else SD21).to(device).eval().requires_grad_(False)
    vae = AutoencoderKL(TINY_VAE if args.tiny else SD_VAE).to(device).eval().requires_grad_(False)
    text = CLIPTextEncoder(TINY_SD2_TEXT if args.tiny else SD2_TEXT).to(device).eval()
    if device == "cuda":
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    prompt_ids = list(recipe.PROMPTS)
    with torch.no_grad():
        contexts = text(torch.randint(0, 49407, (1 + len(prompt_ids), 77), device=device))
        schedule = NoiseSchedule.sd().to(device)
        probe = torch.zeros(1, 4, 8, 8, device=device)
        noise = torch.zeros(1, len(run.timesteps), 4, 8, 8, device=device)
        channels = [f.shape[1] for f in recipe.diffusion_levels(unet, probe, contexts[:1], noise, run.timesteps, schedule)]
    frozen = recipe.Frozen(unet, vae, contexts, prompt_ids, schedule, channels)
    dims, fine, embed, groups = ((128, 64, 32), 32, 32, 8) if args.tiny else ((2048, 1024, 512), 256, 256, 32)
    segmenter = recipe.Segmenter(channels, 19, dims, fine, embed, groups).to(device)
    if device == "cuda":
        segmenter.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(segmenter.parameters(), lr=6e-5, weight_decay=0.01)
    crop, frame = (64, 64) if args.tiny else (512, 512), (64, 128) if args.tiny else (512, 1024)
    image = {s: torch.rand(1, 3, *s, device=device) * 2 - 1 for s in (crop, frame)}
    label = torch.zeros(1, *crop, dtype=torch.long, device=device)
    label[:, : crop[0] // 2] = prompt_ids[0]
    label[:, crop[0] // 2 :, : crop[1] // 2] = prompt_ids[1]

    def infer(model, size):
        return lambda: recipe.predict_logits(model, frozen, image[size], run.timesteps, 0)

    def train(model):
        return lambda: recipe.train_step(model, frozen, opt, image[crop], label, True, run)

    segmenter.eval()
    counted = {("inference", s): flops_of(infer(segmenter, s)) for s in (crop, frame)}
    segmenter.train()
    counted["training", crop] = flops_of(train(segmenter))
    rows = []
    for mode in args.modes.split(","):
        model = segmenter
        if mode == "compile":
            unet.compile(dynamic=False)
            model = torch.compile(segmenter, dynamic=False)
        segmenter.eval()
        for s in (crop, frame):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = timed(infer(model, s), args.iters, 2, device)
            mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            rows.append(("inference", "unconditional branch", s, mode, ms, mem))
            print(f"inference {s} {mode} {ms:.1f} ms {mem:.1f} GiB", flush=True)
        segmenter.train()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = timed(train(model), args.iters, 2, device)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        rows.append(("training", "step, IPKL, 3 prompts", crop, mode, ms, mem))
        print(f"training {crop} {mode} {ms:.1f} ms {mem:.1f} GiB", flush=True)

    gpu = device_name(device)
    cfg = "TINY_SD2 + TINY_VAE" if args.tiny else "SD2.1 U-Net + SD VAE + fusion (2048/1024/512→256) + DAFormer head"
    header = (
        f"# DIFF throughput — {gpu}\n\n"
        f"{datetime.date.today()} · torch {torch.__version__} · {cfg}, random weights · batch 1 · "
        f"{len(run.timesteps)} timesteps in one U-Net call · bf16 autocast over fp32 weights, channels_last · "
        f"median of {args.iters} calls after 2 warm-ups\n\n"
        "| what | H×W | mode | ms | images/s | TFLOP/image | peak memory GiB |\n|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {what}, {detail} | {s[0]}×{s[1]} | {mode} | {ms:.1f} | {1e3 / ms:.2f} | {counted[what, s] / 1e12:.2f} | {mem:.1f} |"
        for what, detail, s, mode, ms, mem in rows
    ]
    write_table(header + "\n".join(lines) + "\n", args.out, f"diff_{file_tag(gpu)}", args.tiny)


if __name__ == "__main__":
    main()
