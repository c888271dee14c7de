"""unet_seg vs diffusers on the same random weights: U-Net (SD2.1, SD1.5) and VAE encode/decode.

    python benchmarks/bench_models.py                       # CUDA, bf16, 512², batch 1 and 8
    python benchmarks/bench_models.py --tiny --device cpu   # smoke test of the script itself

Prints a markdown table (ms per call, images/s, achieved TFLOP/s from torch.utils.flop_counter,
unet_seg/diffusers throughput ratio) and writes it to `--out`. Every (library, model, batch,
mode) is compiled fresh. Needs diffusers (a test dependency of unet_seg).
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

    ref = diffusers.UNet2DConditionModel(**cfg.to_diffusers())
    ours = UNet(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return [(name, m.to(device, dtype).eval()) for name, m in (("unet_seg", ours), ("diffusers", ref))]


def vae_pair(cfg, dtype, device):
    import diffusers

    ref = diffusers.AutoencoderKL(**cfg.to_diffusers())
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="unet-sd21,unet-sd15,vae-encode,vae-decode")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--modes", default="eager,compile", help="eager, compile, compile-max (max-autotune), compile-cg (CUDA graphs)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--iters", type=int, default=20)
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
                result = {}
                for lib, model in pair:
                    fn = calls(kind, lib, model, batch, args.size, getattr(cfg, "context_dim", 0), dtype, device)
                    with torch.no_grad(), sdpa_backend(args.sdpa):
                        flops = flops_of(fn)
                        if mode != "eager":
                            torch._dynamo.reset()
                            compiled = torch.compile(fn, fullgraph=lib == "unet_seg", **compile_kwargs[mode])
                            fn = compiled
                        ms = timed(fn, args.iters, 3, device)
                    result[lib] = ms
                    rows.append((name, batch, mode, lib, ms, 1e3 * batch / ms, flops / ms / 1e9))
                    print(f"{name:11s} b{batch} {mode:11s} {lib:9s} {ms:8.2f} ms", flush=True)
                if len(result) == 2:
                    rows.append((name, batch, mode, "ratio", result["diffusers"] / result["unet_seg"], None, None))
    gpu = device_name(device)
    header = (
        f"# unet_seg vs diffusers — {gpu}\n\n"
        f"{datetime.date.today()} · torch {torch.__version__} · {args.dtype} · {args.size}² images "
        f"({args.size // 8}² latents), text context 77 tokens · channels_last={args.channels_last} · SDPA {args.sdpa} · "
        f"median of {args.iters} calls after 3 warm-ups · random weights{' · TINY configs' if args.tiny else ''}\n\n"
        "| model | batch | mode | library | ms | images/s | TFLOP/s |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for name, batch, mode, lib, ms, ips, tflops in rows:
        if lib == "ratio":
            lines.append(f"| {name} | {batch} | {mode} | **speed-up unet_seg/diffusers** | **{ms:.2f}×** | | |")
        else:
            lines.append(f"| {name} | {batch} | {mode} | {lib} | {ms:.2f} | {ips:.1f} | {tflops:.1f} |")
    table = header + "\n".join(lines) + "\n"
    variant = f"{'_cl' if args.channels_last else ''}{'' if args.sdpa == 'default' else '_' + args.sdpa}{'_' + args.tag if args.tag else ''}"
    write_table(table, args.out, f"models_{file_tag(gpu)}{variant}", args.tiny)

if __name__ == "__main__":
    main()
