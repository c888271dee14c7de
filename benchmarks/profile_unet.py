"""Where the compiled SD U-Net spends its GPU time: kernels grouped into families, one table.

    python benchmarks/profile_unet.py --batch 8          # SD2.1, bf16, 512², channels_last, compiled

Groups CUDA kernel time from torch.profiler into attention / GEMM / convolution / normalisation
and elementwise (fused Triton) / other, over `--iters` calls after warm-up.
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_models import family  # noqa: E402

from unet_seg.models.unet import SD15, SD21, TINY_SD2, UNet  # noqa: E402



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd21", choices=["sd21", "sd15", "tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    cfg = {"sd21": SD21, "sd15": SD15, "tiny": TINY_SD2}[args.config]
    unet = UNet(cfg).cuda().to(torch.bfloat16, memory_format=torch.channels_last).eval()
    lat = args.size // 8
    x = torch.randn(args.batch, 4, lat, lat, device="cuda", dtype=torch.bfloat16)
    t = torch.full((args.batch,), 500, device="cuda")
    ctx = torch.randn(args.batch, 77, cfg.context_dim, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(unet, fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            fn(x, t, ctx)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                fn(x, t, ctx)
            torch.cuda.synchronize()
    per_kernel, per_family = defaultdict(float), defaultdict(float)
    for e in prof.key_averages():
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if us > 0:
            per_kernel[e.key] += us / args.iters
            per_family[family(e.key)] += us / args.iters
    total = sum(per_family.values())
    print(f"# U-Net {args.config} b{args.batch} {args.size}² bf16 channels_last compiled — {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print(f"GPU kernel time per call: {total / 1e3:.2f} ms\n\n| family | ms/call | share |\n|---|---|---|")
    for fam, us in sorted(per_family.items(), key=lambda kv: -kv[1]):
        print(f"| {fam} | {us / 1e3:.2f} | {100 * us / total:.0f}% |")
    print("\n| top kernels | ms/call | share |\n|---|---|---|")
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| `{name[:90]}` | {us / 1e3:.3f} | {100 * us / total:.1f}% |")


if __name__ == "__main__":
    main()
