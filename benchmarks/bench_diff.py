"""DIFF (recipes/diff_gta2cs.py) on one GPU: the official trajectory features against the batched
approximation (`--features batched`), per crop and per training step, in one run.

    python benchmarks/bench_diff.py                                              # CUDA, SD2.1 + SD VAE, random weights
    python benchmarks/bench_diff.py --tiny --device cpu --modes eager --iters 1  # smoke test of the script itself

Timed with the recipe's own functions and settings, batch 1, one 512² crop:
- features per crop: `diffusion_levels` of the crop's latent, unconditional branch (inference):
  trajectory = 34 sequential U-Net calls of 1 row (the 37-step inversion stops after its last saved
  step, 33); batched = ONE call of 9 rows (the 9 saved timesteps forward-noised).
- training step: `train_step` with IPKL on a crop whose label holds 2 of the 5 prompted classes:
  trajectory = 34 calls of 4 rows (conditional "", 2 classes; unconditional ""; both branches in
  each call); batched = one call of 4 × 9 = 36 rows; plus VAE encode, fusion + head per branch,
  backward, clipping, AdamW.
Modes: eager; compile (`torch.compile` of the U-Net calls, static shapes); cudagraphs (`mode=
"reduce-overhead"`: CUDA graphs, the shapes are fixed along a trajectory). Trajectory and batched
are timed in interleaved rounds (A B B A ...). FLOPs counted once, eager (FlopCounterMode);
utilisation = counted FLOP/s over 989 TFLOP/s (H100/H200 SXM dense bf16). Writes the table after
each row, so a run cut short still leaves its rows.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_models import device_name, file_tag, first_call, flops_of, interleaved, load_recipe, spread, write_table  # noqa: E402

from unet_seg.diffusion import NoiseSchedule  # noqa: E402
from unet_seg.models import SD2_TEXT, SD21, SD_VAE, TINY_SD2, TINY_SD2_TEXT, TINY_VAE, AutoencoderKL, CLIPTextEncoder, UNet  # noqa: E402

PEAK_TFLOPS = 989.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="eager,cudagraphs,compile")
    p.add_argument("--iters", type=int, default=3, help="calls per timed segment")
    p.add_argument("--rounds", type=int, default=4, help="interleaved segments per variant")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny configs and the demo's 4-step trajectory (smoke test)")
    p.add_argument("--compile-only", action="store_true", help="only the first calls of the compiled U-Net paths (compile times)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining rows after this many seconds")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    started, device = time.perf_counter(), args.device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    recipe = load_recipe("diff_gta2cs")
    run = recipe.parse_args(["--data-root", tempfile.gettempdir(), "--amp"] +  # an existing folder, checked, never read; bf16 head
                             (["--timesteps", "91", "30", "7", "--trajectory", "7", "30", "91", "120"] if args.tiny else []))

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
    rev = unet.config.channels[::-1]
    channels = [len(run.timesteps) * 6 * rev[i] for i in recipe.LEVELS]
    frozen = recipe.Frozen(unet, vae, contexts, prompt_ids, NoiseSchedule.sd().to(device), channels)
    dims, fine, embed, groups = ((32, 64, 128), 32, 32, 8) if args.tiny else ((512, 1024, 2048), 256, 256, 32)
    crop = (64, 64) if args.tiny else (512, 512)
    segmenter = recipe.Segmenter(channels, 19, dims, fine, embed, groups, recipe.scaled_dilations(crop[0] // 4)).to(device).train()
    if device == "cuda":
        segmenter.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(segmenter.parameters(), lr=6e-5, weight_decay=0.01, fused=True)  # as the recipe
    image = torch.rand(1, 3, *crop, device=device) * 2 - 1
    label = torch.zeros(1, *crop, dtype=torch.long, device=device)
    label[:, : crop[0] // 2] = prompt_ids[0]
    label[:, crop[0] // 2 :, : crop[1] // 2] = prompt_ids[1]
    with torch.no_grad(), recipe.autocast(device):
        z0 = vae.encode(image, sample=True)
    runs = {kind: copy.copy(run) for kind in ("trajectory", "batched")}
    for kind, r in runs.items():
        r.features = kind

    uncond_rows, train_rows = recipe.prompt_rows([None], [], z0.shape[-2:], z0.device), recipe.branch_rows(frozen, label, True, image.device)

    def step_begin():
        if device == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    def features(kind):
        def fn():
            step_begin()
            with torch.no_grad(), recipe.autocast(device):
                return recipe.diffusion_levels(frozen, z0, uncond_rows, runs[kind])

        return fn

    def train(kind):
        def fn():
            step_begin()
            return recipe.train_step(segmenter, frozen, opt, image, label, train_rows, True, runs[kind])

        return fn

    whats = {"features per crop (unconditional)": features, "training step (IPKL, 2 classes)": train}
    plain = {"forward_with_features": unet.forward_with_features, "features": unet.features}
    if args.compile_only:  # the U-Net calls the recipe's --compile compiles, at its shapes; run twice: cold, then warm
        for name, method in plain.items():
            setattr(unet, name, torch.compile(method, dynamic=False))
        rows = [f"| {what} | {kind} | {first_call(make(kind), device):.1f} |" for what, make in whats.items() for kind in runs]
        table = (f"# DIFF first calls (compile) — {device_name(device)}\n\n{datetime.date.today()} · torch {torch.__version__} · "
                 "the U-Net's forward_with_features and features compiled (static shapes), the head eager\n\n"
                 "| what | features | first call s |\n|---|---|---|\n" + "\n".join(rows) + "\n")
        print(table, flush=True)
        write_table(table, args.out, f"diff_compile_{file_tag(device_name(device))}", args.tiny)
        return
    counted = {(w, k): flops_of(make(k)) for w, make in whats.items() for k in runs}
    gpu = device_name(device)
    cfg = "TINY_SD2 + TINY_VAE" if args.tiny else "SD2.1 U-Net + SD VAE + fusion (2048/1024/512→256) + DAFormer head"
    header = (
        f"# DIFF: official trajectory vs batched approximation — {gpu}\n\n"
        f"{datetime.date.today()} · torch {torch.__version__} · {cfg}, random weights · batch 1, {crop[0]}² crop · "
        f"trajectory {len(run.trajectory)} steps (run to step {max(recipe.inversion_schedule(run.trajectory, run.timesteps)[2])}), "
        f"{len(run.timesteps)} saved · bf16 autocast over fp32 weights, channels_last · ms: median (min–max) of "
        f"{args.rounds} interleaved segments of {args.iters} calls, after 2 warm-up calls\n\n"
        "| what | mode | trajectory ms | batched ms | ratio | trajectory TFLOP | batched TFLOP | trajectory util. | batched util. |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for mode in args.modes.split(","):
        if mode != "eager":
            torch._dynamo.reset()
            kw = dict(mode="reduce-overhead") if mode == "cudagraphs" else {}
            for name, method in plain.items():
                setattr(unet, name, torch.compile(method, dynamic=False, **kw))
        for what, make in whats.items():
            if time.perf_counter() - started > args.budget_s:
                print(f"budget spent: skipping {what}, {mode}", flush=True)
                continue
            seg = interleaved({k: make(k) for k in runs}, args.rounds, args.iters, 2, device)
            ms = {k: statistics.median(v) for k, v in seg.items()}
            tflop = {k: counted[what, k] / 1e12 for k in runs}
            util = {k: f"{tflop[k] / ms[k] * 1e3 / PEAK_TFLOPS:.1%}" if device == "cuda" else "–" for k in runs}
            lines.append(
                f"| {what} | {mode} | {spread(seg['trajectory'])} | {spread(seg['batched'])} | "
                f"{ms['trajectory'] / ms['batched']:.1f}× | {tflop['trajectory']:.2f} | {tflop['batched']:.2f} | "
                f"{util['trajectory']} | {util['batched']} |"
            )
            print(lines[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
            write_table(header + "\n".join(lines) + "\n", args.out, f"diff_{file_tag(gpu)}", args.tiny)


if __name__ == "__main__":
    main()
