"""QueryDiff (recipes/querydiff_gta2cs.py) on one GPU: inference crops/s with Mask2Former's
deformable pixel decoder against the plain FPN pixel decoder the recipe used before (a copy of it
lives only here), eager and compiled; and the training step time with and without DCL.

    python benchmarks/bench_querydiff.py                                     # CUDA, 512² crops, bf16
    python benchmarks/bench_querydiff.py --tiny --device cpu --iters 2 --rounds 1   # smoke test (demo sizes)

Inference runs the recipe's `predict_scores` (backbone -> agent queries -> pixel decoder ->
refinement -> 9-layer decoder -> scores) on random weights, the backbone DINOv2-L + Rein. The training
step is the recipe's `train_step` (AdamW, set loss with 12544 importance-sampled points, batch 4
as the paper) with the frozen SD 2.1 U-Net + VAE (random weights) feeding the DCL. Variants are
timed in interleaved rounds (A B B A ...), each round the median of --iters calls.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_models import device_name, file_tag, first_call, load_recipe, timed, write_table  # noqa: E402

from unet_seg.demo import BlockCodec  # noqa: E402
from unet_seg.diffusion import NoiseSchedule  # noqa: E402
from unet_seg.mask2former import SetLossConfig  # noqa: E402
from unet_seg.models import SD21, SD_VAE, AutoencoderKL, UNet  # noqa: E402


class FPNPixelDecoder(nn.Module):
    """The recipe's former pixel decoder (kept here only for this comparison): 1×1 lateral + GN per
    level, top-down sum, 3×3 conv + GN + ReLU -> (stride-4 map, maps at strides 32, 16, 8)."""

    def __init__(self, channels, dim: int):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(8, dim)) for c in channels])
        self.output = nn.ModuleList([nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=False), nn.GroupNorm(8, dim), nn.ReLU(inplace=True)) for _ in channels])

    def forward(self, stages):
        x, outs = None, []
        for i in reversed(range(len(stages))):
            lat = self.lateral[i](stages[i])
            x = lat if x is None else lat + F.interpolate(x, size=lat.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output[i](x))
        return outs[-1], outs[:3]


def interleaved(variants: dict, iters: int, rounds: int, device: str) -> dict:
    """{name: fn} -> {name: median over rounds of the per-round median ms}; order A B, B A, ..."""
    names, times = list(variants), {n: [] for n in variants}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            times[n].append(timed(variants[n], iters, 2 if r == 0 else 1, device))
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="crops per inference call")
    p.add_argument("--train-batch", type=int, default=4, help="crops per training step (paper: 4)")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--compile-only", action="store_true", help="only the first call of the compiled model (compile time)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the demo's sizes at 64² (smoke test)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    recipe = load_recipe("querydiff_gta2cs")
    real = ["--eval-only", "--no-pretrained", "--data-root", tempfile.gettempdir()]  # an existing folder: checked, never read
    rargs = recipe.parse_args(["--demo"] if args.tiny else real)
    if rargs.demo != args.tiny:  # without a data root the recipe falls back to its demo sizes (64² crops)
        raise SystemExit(f"bench_querydiff: the recipe parsed {'demo' if rargs.demo else 'real'} settings")
    num_classes = 6 if args.tiny else 19
    backbone_name = "tiny conv + Rein (demo)" if args.tiny else "DINOv2 ViT-L/16 + Rein (random weights)"
    size, rows = rargs.size, []

    def build(guided: bool, fpn: bool = False, unet=None):
        model = recipe.build_model(rargs, num_classes, guided, unet)
        if fpn:
            model.pixel_decoder = FPNPixelDecoder(model.backbone.channels, rargs.dim)
        return model.to(device)

    # inference: deformable vs FPN pixel decoder, eager and compiled (the training steps in between:
    # compiling is the slowest part, so a short device allowance still gets the step times)
    x = torch.rand(args.batch, 3, size, size, device=device) * 2 - 1
    models = {"deformable": build(False).eval(), "FPN": build(False, fpn=True).eval()}
    params = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in models.items()}

    def inference(mode: str) -> None:
        torch._dynamo.reset()
        nets = {n: torch.compile(m) if mode == "compile" else m for n, m in models.items()}
        ms = interleaved({n: (lambda net=net: recipe.predict_scores(net, x, amp=True)) for n, net in nets.items()}, args.iters, args.rounds, args.device)
        for n, t in ms.items():
            rows.append((f"inference, {n} pixel decoder", args.batch, mode, t))
            print(f"inference {n:10s} b{args.batch} {mode:8s} {t:8.2f} ms  {1e3 * args.batch / t:7.1f} crops/s", flush=True)

    if args.compile_only:  # the recipe's --compile on its inference call; run twice: cold, then warm
        net = torch.compile(models["deformable"])
        seconds = first_call(lambda: recipe.predict_scores(net, x, amp=True), args.device)
        table = (f"# QueryDiff first call (compile) — {device_name(args.device)}\n\n{datetime.date.today()} · torch "
                 f"{torch.__version__} · {backbone_name}, deformable pixel decoder, {args.batch} crops of {size}²\n\n"
                 f"| what | first call s |\n|---|---|\n| inference | {seconds:.1f} |\n")
        print(table, flush=True)
        write_table(table, args.out, f"querydiff_compile_{file_tag(device_name(args.device))}", args.tiny)
        return
    modes = args.modes.split(",")
    for mode in modes[:1]:
        inference(mode)

    # training step with and without DCL (eager)
    if args.tiny:
        unet, vae = UNet(recipe.DEMO_TEACHER).to(device).eval(), BlockCodec().to(device)
    else:
        unet, vae = UNet(SD21).to(device, torch.bfloat16).eval(), AutoencoderKL(SD_VAE).to(device, torch.bfloat16).eval()
    unet.requires_grad_(False), vae.requires_grad_(False)
    context = torch.zeros(1, 2, unet.config.context_dim, device=device)  # the release's un-padded empty prompt: BOS, EOS
    teacher = (unet, vae, context, NoiseSchedule.sd().to(device), (recipe.T_WEAK, recipe.T_STRONG))
    xb = torch.rand(args.train_batch, 3, size, size, device=device) * 2 - 1
    labels = torch.randint(0, num_classes, (args.train_batch, size // 32, size // 32), device=device)
    labels = labels.repeat_interleave(32, 1).repeat_interleave(32, 2)
    loss_cfg = SetLossConfig(points=rargs.points)
    steps = {}
    for name, weight in (("with DCL", 1.0), ("without DCL", 0.0)):
        model = build(weight > 0, unet=unet).train()
        opt = torch.optim.AdamW(recipe.param_groups(model, 1e-4, 0.1), lr=1e-4, fused=True)
        steps[name] = (lambda m=model, o=opt, w=weight: recipe.train_step(m, o, xb, labels, num_classes, loss_cfg, w, teacher if w else None, amp=True))
        params[f"train {name}"] = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    for n, t in interleaved(steps, max(2, args.iters // 2), args.rounds, args.device).items():
        rows.append((f"training step {n} (AdamW, set loss {rargs.points} points)", args.train_batch, "eager", t))
        print(f"train step {n:12s} b{args.train_batch} {t:8.2f} ms", flush=True)
    del steps, model, opt
    for mode in modes[1:]:
        inference(mode)
    if device.type == "cuda":
        rows.append((f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", "", "", float("nan")))

    gpu = device_name(args.device)
    header = (
        f"# QueryDiff: deformable vs FPN pixel decoder, training step with DCL — {gpu}\n\n"
        f"{datetime.date.today()} · torch {torch.__version__} · bf16 autocast · {size}² crops · {backbone_name}, "
        f"{rargs.queries} agent queries, pixel decoder {rargs.pixel_layers} layers, decoder d {rargs.dim} × {rargs.decoder_layers} layers, "
        f"{num_classes} classes · parameters (M): " + ", ".join(f"{k} {v:.1f}" for k, v in params.items()) + " · "
        f"median over {args.rounds} interleaved rounds of the median of {args.iters} calls\n\n"
        "| what | batch | mode | ms | crops/s |\n|---|---|---|---|---|\n"
    )
    lines = [f"| {what} | {b} | {mode} | {ms:.2f} | {1e3 * b / ms:.1f} |" if b else f"| {what} | | | | |" for what, b, mode, ms in rows]
    write_table(header + "\n".join(lines) + "\n", args.out, f"querydiff_{file_tag(gpu)}", args.tiny)


if __name__ == "__main__":
    main()
