"""unet_seg vs diffusers on the same random weights: U-Net (SD2.1, SD1.5) and VAE encode/decode.

    python benchmarks/bench_models.py                       # CUDA, bf16, 512², batch 1 and 8
    python benchmarks/bench_models.py --tiny --device cpu   # smoke test of the script itself

Prints a markdown table (ms per call, images/s, achieved TFLOP/s from torch.utils.flop_counter,
unet_seg/diffusers throughput ratio) and writes it to `--out`. Every (library, model, batch,
mode) is compiled fresh. The two libraries are timed in interleaved rounds, A B B A A B B A ...
(`--rounds` segments each, `--iters` calls per segment), because a GPU's clock drifts by ~20%
within a minute: the table gives the median over segments and their spread (min–max of the
segment medians), and the ratio of the medians. Needs diffusers (a test dependency of unet_seg).

Also the shared helpers of the other benchmarks: `first_call`, `timed`, `interleaved`, `profile_kernels`,
`flops_of`, `load_recipe`, `write_table`.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unet_seg.models.unet import SD15, SD21, TINY_SD1, TINY_SD2, UNet  # noqa: E402
from unet_seg.models.vae import SD_VAE, TINY_VAE, AutoencoderKL  # noqa: E402
from unet_seg.hub_config import unet_to_diffusers, vae_to_diffusers  # noqa: E402


def first_call(fn, device: str) -> float:
    """Seconds of one call of `fn` until its GPU work is done: for a freshly compiled `fn`, the
    compile time (cold with an empty on-disk cache, warm in a second process with the same cache)."""
    start = time.perf_counter()
    fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fn, iters: int, warmup: int, device: str) -> float:
    """Median milliseconds of `fn()` after `warmup` calls (the first ones compile)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def interleaved(fns: dict, rounds: int, iters: int, warmup: int, device: str) -> dict[str, list[float]]:
    """{name: zero-argument callable} -> {name: the median ms of each of its `rounds` segments}.

    Segments alternate A B B A A B B A ... over two callables (for more: forward, then backward,
    order each round), so that a drifting clock favours none; `warmup` calls of each first."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    segments = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            segments[name].append(timed(fns[name], iters, 0, device))
    return segments


def spread(values: list[float]) -> str:
    """'median (min–max)' of segment medians, for tables."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


FAMILIES = [  # first match wins; kernel names as cuDNN / cuBLAS / flash / Triton print them
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "implicit", "cudnn", "xmma_fprop", "xmma_dgrad", "xmma_wgrad", "sm90_xmma")),
    ("gemm", ("gemm", "cutlass", "cublas", "nvjet", "matmul")),
    ("optimizer / foreach", ("multi_tensor", "foreach", "adam")),
    ("triton (fused norm/act/elementwise)", ("triton",)),
    ("copy / fill", ("memcpy", "memset", "copy", "fill")),
]


def family(name: str) -> str:
    low = name.lower()
    return next((fam for fam, keys in FAMILIES if any(k in low for k in keys)), "other")


def profile_kernels(fn, iters: int) -> dict:
    """Profile `iters` calls of `fn` (CUDA, warmed up) -> {"wall_ms", "kernel_ms" (summed kernel
    time per call), "families": {family: ms per call}, "top": [(kernel, ms per call)]}. Wall time
    well above kernel time is GPU idle time: host overhead, launch gaps or syncs."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        wall = 1e3 * (time.perf_counter() - t0) / iters
    per_kernel, per_family = defaultdict(float), defaultdict(float)
    for e in prof.key_averages():
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if us > 0:
            per_kernel[e.key] += us / iters / 1e3
            per_family[family(e.key)] += us / iters / 1e3
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:10]
    return {"wall_ms": wall, "kernel_ms": sum(per_family.values()), "families": dict(per_family), "top": top}


def profile_table(title: str, prof: dict, tflop: float) -> str:
    """Markdown for `profile_kernels`' result; `tflop`: counted TFLOP per call."""
    k, w = prof["kernel_ms"], prof["wall_ms"]
    lines = [
        f"### {title}\n",
        f"wall {w:.2f} ms/call, kernels {k:.2f} ms/call: GPU idle {max(w - k, 0) / w:.0%} of the wall time "
        f"(host overhead, launch gaps, syncs); {tflop:.2f} TFLOP/call = {tflop / k * 1e3:.0f} TFLOP/s over kernel time, "
        f"{tflop / w * 1e3:.0f} over wall time\n",
        "| kernel family | ms/call | share |\n|---|---|---|",
    ]
    lines += [f"| {f} | {ms:.2f} | {ms / k:.0%} |" for f, ms in sorted(prof["families"].items(), key=lambda kv: -kv[1])]
    lines += ["\n| top kernels | ms/call |\n|---|---|"] + [f"| `{n[:80]}` | {ms:.3f} |" for n, ms in prof["top"]]
    return "\n".join(lines) + "\n"


def sdpa_backend(name: str):
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return nullcontext() if name == "default" else sdpa_kernel(backends[name])


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's, for table headers and result file names."""
    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"


def write_table(table: str, out: str, stem: str, tiny: bool = False) -> None:
    """Print a markdown table and write it to `out/<stem>[_tiny].md` (stem gets the device tag)."""
    print(table)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}{'_tiny' if tiny else ''}.md").write_text(table)


def load_recipe(name: str):
    """recipes/<name>.py as a module (registered in sys.modules: recipes define dataclasses)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def file_tag(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def unet_pair(cfg, dtype, device):
    import diffusers

    ref = diffusers.UNet2DConditionModel(**unet_to_diffusers(cfg))
    ours = UNet(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return [(name, m.to(device, dtype).eval()) for name, m in (("unet_seg", ours), ("diffusers", ref))]


def vae_pair(cfg, dtype, device):
    import diffusers

    ref = diffusers.AutoencoderKL(**vae_to_diffusers(cfg))
    ours = AutoencoderKL(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return [(name, m.to(device, dtype).eval()) for name, m in (("unet_seg", ours), ("diffusers", ref))]


def calls(kind: str, lib: str, model, batch: int, size: int, ctx_dim: int, dtype, device):
    """A zero-argument callable running one forward of `kind` for `lib`'s model."""
    g = torch.Generator(device).manual_seed(0)
    lat = size // 8
    if kind == "unet":
        x = torch.randn(batch, 4, lat, lat, generator=g, device=device, dtype=dtype)
        t = torch.full((batch,), 500, device=device)
        ctx = torch.randn(batch, 77, ctx_dim, generator=g, device=device, dtype=dtype)
        if lib == "unet_seg":
            return lambda: model(x, t, ctx)
        return lambda: model(x, t, ctx, return_dict=False)[0]
    if kind == "vae-encode":
        img = torch.rand(batch, 3, size, size, generator=g, device=device, dtype=dtype) * 2 - 1
        if lib == "unet_seg":
            return lambda: model.encode(img)
        return lambda: model.encode(img).latent_dist.mean * model.config.scaling_factor
    z = torch.randn(batch, 4, lat, lat, generator=g, device=device, dtype=dtype)
    if lib == "unet_seg":
        return lambda: model.decode(z)
    return lambda: model.decode(z / model.config.scaling_factor).sample


def _no_grad_call(fn, sdpa: str):
    with torch.no_grad(), sdpa_backend(sdpa):
        return fn()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="unet-sd21,unet-sd15,vae-encode,vae-decode")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--modes", default="eager,compile", help="eager, compile, compile-max (max-autotune), compile-cg (CUDA graphs)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--iters", type=int, default=10, help="calls per timed segment")
    p.add_argument("--rounds", type=int, default=8, help="segments per library, interleaved A B B A ...")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--sdpa", default="default", choices=["default", "flash", "cudnn", "efficient"], help="SDPA backend")
    p.add_argument("--libs", default="unet_seg,diffusers")
    p.add_argument("--tiny", action="store_true", help="tiny configs (smoke test)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the result file name (e.g. the experiment)")
    args = p.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    configs = {
        "unet-sd21": ("unet", TINY_SD2 if args.tiny else SD21),
        "unet-sd15": ("unet", TINY_SD1 if args.tiny else SD15),
        "vae-encode": ("vae-encode", TINY_VAE if args.tiny else SD_VAE),
        "vae-decode": ("vae-decode", TINY_VAE if args.tiny else SD_VAE),
    }
    compile_kwargs = {
        "compile": {},
        "compile-max": {"mode": "max-autotune-no-cudagraphs"},
        "compile-cg": {"mode": "reduce-overhead"},
    }
    rows = []
    for name in args.models.split(","):
        kind, cfg = configs[name]
        pair = unet_pair(cfg, dtype, device) if kind == "unet" else vae_pair(cfg, dtype, device)
        if args.channels_last:
            pair = [(lib, m.to(memory_format=torch.channels_last)) for lib, m in pair]
        pair = [(lib, m) for lib, m in pair if lib in args.libs.split(",")]
        for batch in map(int, args.batches.split(",")):
            for mode in args.modes.split(","):
                fns, flops = {}, {}
                torch._dynamo.reset()
                for lib, model in pair:
                    fn = calls(kind, lib, model, batch, args.size, getattr(cfg, "context_dim", 0), dtype, device)
                    with torch.no_grad(), sdpa_backend(args.sdpa):
                        flops[lib] = flops_of(fn)
                    if mode != "eager":
                        fn = torch.compile(fn, fullgraph=lib == "unet_seg", **compile_kwargs[mode])
                    fns[lib] = lambda fn=fn: _no_grad_call(fn, args.sdpa)
                segments = interleaved(fns, args.rounds, args.iters, 3, device)
                for lib, seg in segments.items():
                    ms = statistics.median(seg)
                    rows.append((name, batch, mode, lib, seg, 1e3 * batch / ms, flops[lib] / ms / 1e9))
                    print(f"{name:11s} b{batch} {mode:11s} {lib:9s} {spread(seg)} ms", flush=True)
                if len(segments) == 2:
                    ratio = statistics.median(segments["diffusers"]) / statistics.median(segments["unet_seg"])
                    rows.append((name, batch, mode, "ratio", ratio, None, None))
    gpu = device_name(device)
    header = (
        f"# unet_seg vs diffusers — {gpu}\n\n"
        f"{datetime.date.today()} · torch {torch.__version__} · {args.dtype} · {args.size}² images "
        f"({args.size // 8}² latents), text context 77 tokens · channels_last={args.channels_last} · SDPA {args.sdpa} · "
        f"libraries interleaved in {args.rounds} segments of {args.iters} calls each (A B B A ...), after 3 warm-ups · "
        f"ms: median of the segment medians (min–max) · random weights{' · TINY configs' if args.tiny else ''}\n\n"
        "| model | batch | mode | library | ms (min–max) | images/s | TFLOP/s |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, batch, mode, lib, ms, ips, tflops in rows:
        if lib == "ratio":
            lines.append(f"| {name} | {batch} | {mode} | **speed-up unet_seg/diffusers** | **{ms:.2f}×** | | |")
        else:
            lines.append(f"| {name} | {batch} | {mode} | {lib} | {spread(ms)} | {ips:.1f} | {tflops:.1f} |")
    table = header + "\n".join(lines) + "\n"
    variant = f"{'_cl' if args.channels_last else ''}{'' if args.sdpa == 'default' else '_' + args.sdpa}{'_' + args.tag if args.tag else ''}"
    write_table(table, args.out, f"models_{file_tag(gpu)}{variant}", args.tiny)

if __name__ == "__main__":
    main()
