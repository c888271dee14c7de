"""Timestep feature taps: K timesteps in one batched U-Net call vs a loop of K calls.

    python benchmarks/bench_taps.py                                  # CUDA, bf16, SD2.1, 512², K = 1,2,4,8
    python benchmarks/bench_taps.py --tiny --device cpu --iters 2    # smoke test of the script itself

Both variants go through `unet_seg.taps.timestep_features` with the same noise: "batched" asks
for all K timesteps at once (batch B·K), "loop" calls it once per timestep (batch B). Decoder
features by default, so the run stops after the deepest one requested. Prints a markdown table
(median ms per K-timestep extraction, speed-up loop/batched) and writes it to
`--out/taps_<gpu>.md`. Random weights; compiled once with static shapes (one graph per batch size).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_models import device_name, file_tag, timed, write_table  # noqa: E402

from unet_seg.diffusion import NoiseSchedule  # noqa: E402
from unet_seg.models.unet import SD21, TINY_SD2, UNet  # noqa: E402
from unet_seg.taps import timestep_features  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="1,2,4,8", help="numbers of timesteps K")
    p.add_argument("--names", default="up.0,up.1,up.2,up.3", help="feature names (unet.feature_names)")
    p.add_argument("--batch", type=int, default=1, help="images B")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="tiny SD2 config (smoke test)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    cfg = TINY_SD2 if args.tiny else SD21
    unet = UNet(cfg).to(device, dtype).eval()
    names = args.names.split(",")
    ks = [int(k) for k in args.ks.split(",")]
    b, lat = args.batch, args.size // 8
    g = torch.Generator(device).manual_seed(0)
    z0 = torch.randn(b, cfg.in_channels, lat, lat, generator=g, device=device, dtype=dtype)
    ctx = torch.randn(b, 77, cfg.context_dim, generator=g, device=device, dtype=dtype)
    noise = torch.randn(b, max(ks), cfg.in_channels, lat, lat, generator=g, device=device, dtype=dtype)
    schedule = NoiseSchedule.sd().to(device)
    all_ts = torch.linspace(50, 950, max(ks), device=device).long()  # a tensor: no recompile per value

    def taps(ts, eps):
        return timestep_features(unet, z0, ts, ctx, names, schedule=schedule, noise=eps)

    runs = {"eager": taps, "compile": torch.compile(taps, fullgraph=True, dynamic=False)}
    rows = []
    with torch.inference_mode():
        shapes = {n: tuple(f.shape[2:]) for n, f in taps(all_ts[:1], noise[:, :1]).items()}
        for k in ks:
            ts = all_ts[:k]
            for mode in args.modes.split(","):
                run = runs[mode]
                batched = lambda: run(ts, noise[:, :k])  # noqa: E731
                loop = lambda: [run(ts[i : i + 1], noise[:, i : i + 1]) for i in range(k)]  # noqa: E731
                ms_loop, ms_batched = timed(loop, args.iters, 3, device), timed(batched, args.iters, 3, device)
                rows.append((k, mode, ms_loop, ms_batched))
                print(f"K={k} {mode:8s} loop {ms_loop:8.2f} ms  batched {ms_batched:8.2f} ms", flush=True)

    gpu = device_name(device)
    feats = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    header = (
        f"# Timestep feature taps: one batched call vs a per-timestep loop — {gpu}\n\n"
        f"{datetime.date.today()} · torch {torch.__version__} · {args.dtype} · "
        f"{'TINY_SD2' if args.tiny else 'SD21'} U-Net, random weights · {b}×{args.size}² images → "
        f"latents [{b}, {cfg.in_channels}, {lat}, {lat}], text context [{b}, 77, {cfg.context_dim}] · "
        f"features {feats} · median of {args.iters} calls after 3 warm-ups · ms per extraction of K timesteps\n\n"
        "| K | mode | loop of K calls (ms) | one batched call (ms) | speed-up |\n|---|---|---|---|---|\n"
    )
    lines = [f"| {k} | {mode} | {lp:.2f} | {bt:.2f} | **{lp / bt:.2f}×** |" for k, mode, lp, bt in rows]
    table = header + "\n".join(lines) + "\n"
    write_table(table, args.out, f"taps_{file_tag(gpu)}", args.tiny)

if __name__ == "__main__":
    main()
