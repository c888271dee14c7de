"""DiffewS (recipes/diffews_coco20i.py) on one GPU: episode inference and training throughput.

    python benchmarks/bench_diffews.py                                  # CUDA, SD2.1 + SD VAE, 512²
    python benchmarks/bench_diffews.py --compile-only                   # first-call (compile) times only
    python benchmarks/bench_diffews.py --tiny --device cpu --iters 1 --rounds 2   # smoke test
    python benchmarks/bench_diffews.py --shots 1,5 --train-batches 2 --no-baseline --eager  # GPU hours, one call

The timed functions are the recipe's own (`predict_masks`, `train_step`), on random weights, beside
the episode as issue 8 measured it ("issue 8": support images and support masks in two VAE calls,
the masks' value check a host sync, the training target a third VAE call; unfused AdamW), timed in
interleaved rounds (A B B A ...; `--rounds` segments of `--iters` calls each). "CUDA graph"
captures the recipe's compiled inference episode once and replays it (possible only because the
episode has no host sync); in training it is the recipe's `--cuda-graph` (`CudaGraphStep`: the
whole step, optimiser included, one graph). "latent cache" is the recipe's `--cache-dir` step
(`cached_train_step`): the VAE posteriors of the step's images and masks computed once before
timing (as the cache stores them: bf16 on a GPU) and z = μ + σ·ε drawn in the step, so the frozen
VAE's encodes leave it; its inputs are on the device already, as the uncached step's images are
(the loader's copy of either is not timed; posteriors are 1/12 of the images' bytes at 512²).
Training steps read the loss after each step, as the recipe's loop does. One inference episode: one VAE call encodes query, supports and
support masks, one U-Net call on [query, supports] with KV fusion, the VAE decodes the query's
mask latent, relative threshold. One training step: the same encodes (posterior samples, and the
query mask), U-Net forward and backward, latent MSE, grad clip, AdamW. U-Net fp32 weights under
bf16 autocast and the frozen VAE in bf16, as the recipe runs on a GPU; U-Net and the VAE's encoder
and decoder compiled (static shapes), channels_last. "FLOP limit": the throughput the counted FLOPs
(torch.utils.flop_counter) allow at the bf16 matmul rate measured in the same run. "first call":
seconds of the first call, which compiles (cold on a fresh machine; rerun with --compile-only for
the warm on-disk cache). Profiles (kernel families, GPU idle time) of the recipe's paths follow.

Then GPU hours: each training variant's rate projected onto the paper's strict schedule (10 000
iterations × 16 episodes = 160 000 episodes per run, 1-shot steps: DiffewS-n's 1..7-shot steps
cost more) and onto its Table 2 (4 folds × {DiffewS, DiffewS-n} = 8 runs), one GPU, plus each
run's evaluation (1000 1-shot and 1000 5-shot episodes) at the measured inference rates where
they were measured in the same call.
"""

from __future__ import annotations

import argparse
import datetime
import math
import functools
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_models import (  # noqa: E402
    device_name, file_tag, first_call, flops_of, interleaved, load_recipe, profile_kernels, profile_table, spread, timed, write_table,
)

from unet_seg.codecs import mask_to_image, mask_to_latent  # noqa: E402
from unet_seg.models import SD21, SD_VAE, TINY_SD2, TINY_VAE, AutoencoderKL, UNet  # noqa: E402
from unet_seg.train import CudaGraphStep, autocast, check_finite_everywhere  # noqa: E402


def matmul_tflops(device: str) -> float:
    """Measured dense bf16 matmul rate (8192³), the ceiling the FLOP limit is taken against."""
    if device != "cuda":
        return float("nan")
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / timed(lambda: a @ b, 20, 3, device) / 1e9


# ---- the episode as issue 8 measured it (the baseline of the interleaved rounds)


def issue8_unet_input(vae, query, supports, support_masks, sample: bool) -> torch.Tensor:
    g, s = supports.shape[:2]
    images = torch.cat([query[:, None], supports], dim=1).flatten(0, 1)
    z = vae.encode(images, sample=sample).unflatten(0, (g, 1 + s))
    m = vae.encode(mask_to_image(support_masks.flatten(0, 1)), sample=sample).unflatten(0, (g, s))  # checks: a sync
    m = torch.cat([torch.zeros_like(m[:, :1]), m], dim=1)
    return torch.cat([z, m], dim=2).flatten(0, 1)


@torch.no_grad()
def issue8_predict_masks(recipe, unet, vae, context, query, supports, support_masks) -> torch.Tensor:
    x = issue8_unet_input(vae, query, supports, support_masks, sample=False)
    pred = recipe.query_prediction(unet, x.float(), context, supports.shape[1], subsample=False)
    return recipe.binarise(vae.decode(-pred.to(x.dtype)))


def issue8_train_step(recipe, model, unet, vae, context, opt, query, query_mask, supports, support_masks):
    with torch.no_grad():
        x = issue8_unet_input(vae, query, supports, support_masks, sample=True)
        target = -mask_to_latent(vae, query_mask)
    with autocast(query.device):
        pred = recipe.query_prediction(model, x, context, supports.shape[1], subsample=False)
    loss = check_finite_everywhere(torch.nn.functional.mse_loss(pred.float(), target), "latent MSE")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    return loss


@torch.no_grad()
def cached_posteriors(vae, query, query_mask, supports, support_masks) -> list[torch.Tensor]:
    """The posteriors [.., 2, 4, h, w] `cached_train_step` reads, as the latent cache stores them
    (one per image and mask, in the VAE's dtype): (query, query mask, supports, support masks)."""
    g, k = supports.shape[:2]
    images = torch.cat([query, supports.flatten(0, 1), mask_to_image(support_masks.flatten(0, 1)), mask_to_image(query_mask)])
    post = vae.posterior(images)
    q, s, m, qm = post.split([g, g * k, g * k, g])
    return [q, qm, s.unflatten(0, (g, k)), m.unflatten(0, (g, k))]


PAPER_EPISODES = 10_000 * 16  # strict COCO-20i setting: 10 000 iterations, total batch 16
TABLE_RUNS = 8  # Table 2: 4 folds x {DiffewS, DiffewS-n}
EVAL_EPISODES = 1000  # per fold and shot setting


def gpu_hours(rows, gpu: str) -> str:
    """Projected hours of the paper's schedule for each training variant in `rows`."""
    rate = {(what, k, n, name): 1e3 * n / statistics.median(seg) for what, k, n, name, seg, *_ in rows}
    inference = {k: r for (what, k, n, name), r in rate.items() if what == "inference" and name == "recipe"}
    eval_h = sum(EVAL_EPISODES / inference[k] for k in (1, 5)) / 3600 if {1, 5} <= inference.keys() else math.nan
    lines = [
        f"| {name} | {n} | {r:.1f} | {PAPER_EPISODES / r / 3600:.2f} | {eval_h:.2f} | {TABLE_RUNS * (PAPER_EPISODES / r / 3600 + eval_h):.1f} |"
        for (what, k, n, name), r in rate.items() if what == "training"
    ]
    return (
        f"### GPU hours on one {gpu}, projected (DiffewS strict COCO-20i schedule: 10 000 iterations × 16 episodes)\n\n"
        "| training variant | episodes/step | episodes/s | training h per run | evaluation h per run (1000 1-shot + 1000 5-shot) | "
        f"Table 2 h ({TABLE_RUNS} runs) |\n|---|---|---|---|---|---|\n" + "\n".join(lines)
        + "\n\n1-shot training steps: DiffewS-n's 1..7-shot steps cost more; evaluation nan where --shots did not hold 1 and 5."
    )


def cuda_graph(fn, *inputs):
    """Capture fn(*inputs) (static inputs, warmed up on a side stream) -> replay callable."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*inputs)
    return lambda: (graph.replay(), out)[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="inference episodes per call")
    p.add_argument("--shots", default="1,5", help="inference shot settings (the baseline and CUDA graph: 1-shot only)")
    p.add_argument("--train-batches", default="2", help="episodes per training step (2 = the paper's per-GPU batch)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--iters", type=int, default=5, help="calls per timed segment")
    p.add_argument("--rounds", type=int, default=6, help="segments per variant, interleaved")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile-only", action="store_true", help="only the recipe's first calls (compile times)")
    p.add_argument("--eager", action="store_true", help="nothing compiled (minutes of compiling saved; the levers' glue shows more)")
    p.add_argument("--no-baseline", action="store_true", help="skip the issue-8 episode")
    p.add_argument("--tiny", action="store_true", help="tiny configs (smoke test)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device, cuda = args.device, args.device == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    recipe = load_recipe("diffews_coco20i")
    peak = float("nan") if args.compile_only else matmul_tflops(device)

    torch.manual_seed(0)
    with torch.device(device):  # initialised on the GPU: seconds instead of a minute
        unet = UNet(TINY_SD2 if args.tiny else SD21).add_support_conv_in(8)
        vae = AutoencoderKL(TINY_VAE if args.tiny else SD_VAE).to(torch.bfloat16 if cuda else torch.float32)
    vae.eval().requires_grad_(False)
    if cuda:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    context = torch.randn(1, 77, unet.config.context_dim, device=device)  # training: padded empty prompt
    test_context = context[:, :2]  # inference: unpadded [BOS, EOS], as the recipe
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-5, weight_decay=1e-2, fused=True)  # as the recipe
    opt_issue8 = torch.optim.AdamW(unet.parameters(), lr=3e-5, weight_decay=1e-2)  # as the recipe was (foreach)
    if cuda:  # as the recipe's --cuda-graph
        opt_graph = torch.optim.AdamW(unet.parameters(), lr=torch.tensor(3e-5, device=device), weight_decay=1e-2, fused=True, capturable=True)
    g = torch.Generator(device).manual_seed(0)

    def episodes(n: int, shots: int):
        s = args.size
        query = torch.rand(n, 3, s, s, generator=g, device=device) * 2 - 1
        supports = torch.rand(n, shots, 3, s, s, generator=g, device=device) * 2 - 1
        masks = (torch.rand(n, shots, s, s, generator=g, device=device) > 0.5).long()
        query_mask = (torch.rand(n, s, s, generator=g, device=device) > 0.5).long()
        return query, supports, masks, query_mask

    shots_list, train_batches = [int(k) for k in args.shots.split(",") if k], [int(n) for n in args.train_batches.split(",") if n]

    def bf16(fn, *a):  # the recipe evaluates in fp32 (the official evaluation); the issue's targets are bf16
        with autocast(device):
            return fn(*a)
    unet_call = unet

    def variants(what: str, n: int, k: int, counting: bool = False) -> dict:
        q, s, m, qm = episodes(n, k)
        if what == "inference":
            fns = {"recipe": lambda: bf16(recipe.predict_masks, unet_call, vae, test_context, q, s, m)}
            if k == 1 and not args.no_baseline:
                fns["issue 8"] = lambda: bf16(issue8_predict_masks, recipe, unet_call, vae, test_context, q, s, m)
            return fns
        fns = {"recipe": lambda: check_finite_everywhere(recipe.train_step(unet_call, unet, vae, context, opt, q, qm, s, m), "loss")}
        if cuda and not counting:
            graphed = CudaGraphStep(functools.partial(recipe.train_step, unet_call, unet, vae, context, opt_graph), [unet_call], opt_graph)
            fns["recipe, CUDA graph"] = lambda: check_finite_everywhere(graphed(q, qm, s, m), "loss")
        post = cached_posteriors(vae, q, qm, s, m)
        fns["latent cache"] = lambda: check_finite_everywhere(recipe.cached_train_step(unet_call, unet, context, opt, *post), "loss")
        if cuda and not counting:
            graphed_cache = CudaGraphStep(functools.partial(recipe.cached_train_step, unet_call, unet, context, opt_graph), [unet_call], opt_graph)
            fns["latent cache, CUDA graph"] = lambda: check_finite_everywhere(graphed_cache(*post), "loss")
        if not args.no_baseline:
            fns["issue 8"] = lambda: issue8_train_step(recipe, unet_call, unet, vae, context, opt_issue8, q, qm, s, m)
        return fns

    configs = [("inference", args.batch, k) for k in shots_list] + [("training", n, 1) for n in train_batches]
    counted = {}  # TFLOP per call of each variant, counted in eager mode
    if not args.compile_only:
        for what, n, k in configs:
            unet.train(what == "training")
            for name, fn in variants(what, n, k, counting=True).items():
                counted[what, n, k, name] = flops_of(fn) / 1e12

    if cuda and not args.eager:  # as the recipe's --compile (static shapes here: each shape compiled once, no dynamic graphs)
        unet_call = torch.compile(unet, dynamic=False)
        vae.encoder.compile(dynamic=False)
        vae.decoder.compile(dynamic=False)
    rows, profiles, firsts = [], [], {}
    for what, n, k in configs:
        unet.train(what == "training")
        fns = variants(what, n, k)
        if args.compile_only:
            fns = {"recipe": fns["recipe"]}
        for name, fn in fns.items():
            firsts[what, n, k, name] = first_call(fn, device)
            print(f"{what} {k}-shot x{n} {name}: first call {firsts[what, n, k, name]:.1f} s", flush=True)
        if args.compile_only:
            continue
        if cuda and what == "inference" and k == 1:
            q, s, m, _ = episodes(n, k)
            try:
                fns["recipe, CUDA graph"] = cuda_graph(lambda *a: bf16(recipe.predict_masks, unet_call, vae, test_context, *a), q, s, m)
            except Exception as e:  # a host sync inside the episode makes capture fail: say so
                print(f"CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        segments = interleaved(fns, args.rounds, args.iters, 2, device)
        for name, seg in segments.items():
            rows.append((what, k, n, name, seg, counted[what, n, k, name.replace(", CUDA graph", "")], firsts.get((what, n, k, name))))
            print(f"{what} {k}-shot x{n} {name}: {spread(seg)} ms", flush=True)
        profiled = ["recipe"] + (["recipe, CUDA graph", "latent cache, CUDA graph"] if what == "training" else [])  # inference: GPU-bound
        for name in profiled if cuda and k == 1 else []:
            try:
                prof = profile_kernels(fns[name], 3)
                profiles.append(profile_table(f"{what}, {k}-shot, {n} episodes/call, {name}", prof, counted[what, n, k, name.replace(", CUDA graph", "")]))
                print(profiles[-1], flush=True)
            except Exception as e:
                print(f"profile failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        del fns, segments
        if cuda:
            torch.cuda.empty_cache()

    gpu = device_name(device)
    cfg = "TINY_SD2 + TINY_VAE" if args.tiny else "SD2.1 U-Net (conv_in 8 ch) + SD VAE"
    if args.compile_only:
        lines = [f"| {what} | {k} | {n} | {s:.1f} |" for (what, n, k, _), s in firsts.items()]
        table = (f"# DiffewS first calls (compile), second process — {gpu}\n\n{datetime.date.today()} · torch {torch.__version__} · "
                 f"{cfg}\n\n| what | shots | episodes/call | first call s |\n|---|---|---|---|\n" + "\n".join(lines) + "\n")
        write_table(table, args.out, f"diffews_compile_{file_tag(gpu)}", args.tiny)
        return
    header = (
        f"# DiffewS episode throughput — {gpu}\n\n"
        f"{datetime.date.today()} · torch {torch.__version__} · {cfg}, random weights · {args.size}² images · "
        f"U-Net fp32 weights under bf16 autocast (inference too: the recipe's own evaluation runs the U-Net in fp32), VAE bf16, "
        f"channels_last on CUDA, {'eager' if args.eager or not cuda else 'all compiled'} · KV fusion on every "
        f"self-attention · variants interleaved in {args.rounds} segments of {args.iters} calls · ms: median of the segment "
        f"medians (min–max) · measured bf16 matmul peak {peak:.0f} TFLOP/s\n\n"
        "| what | shots | episodes/call | variant | ms (min–max) | episodes/s | TFLOP/episode | FLOP limit (episodes/s) | of limit | first call s |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for what, k, n, name, seg, tflop, first in rows:
        eps = 1e3 * n / statistics.median(seg)
        limit = peak / (tflop / n)
        first = "" if first is None else f"{first:.1f}"
        lines.append(f"| {what} | {k} | {n} | {name} | {spread(seg)} | {eps:.1f} | {tflop / n:.2f} | {limit:.1f} | {eps / limit:.0%} | {first} |")
    table = header + "\n".join(lines) + "\n\n" + gpu_hours(rows, gpu) + "\n\n" + "\n".join(profiles)
    write_table(table, args.out, f"diffews_{file_tag(gpu)}{'_eager' if args.eager else ''}", args.tiny)


if __name__ == "__main__":
    main()
