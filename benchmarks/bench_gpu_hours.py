"""GPU hours per paper schedule: each recipe's training step on one GPU, timed in interleaved
rounds, projected onto the schedule its paper trained with.

    python benchmarks/bench_gpu_hours.py                                   # CUDA, eager, 512², bf16
    python benchmarks/bench_gpu_hours.py --recipes diffews --compile       # the recipes' --compile (minutes first)
    python benchmarks/bench_gpu_hours.py --tiny --device cpu --iters 1 --rounds 2   # smoke test

Each recipe's own `train_step` on random weights (SD 2.1-sized U-Net, SD VAE) at its per-GPU
batch, the frozen parts in bf16 and training under bf16 autocast as the recipes run on a GPU:
- DiffewS: 2 episodes, 1-shot; encoding every step (the default) and from the latent cache
  (`--cache-dir`: posteriors computed once before timing, `cached_train_step` draws z = μ + σ·ε),
  each plain and as one CUDA graph (`--cuda-graph`). Schedule: 10 000 iterations × 16 episodes.
- DIFF: one 512² crop, IPKL, the official trajectory features. Schedule: 40 000 × 1.
- QueryDiff: 4 crops of 512², DCL on (DINOv2-L + Rein, random weights). Schedule: 60 000 × 4.
- DiGSeg: 2 images of 512², the paper's trainable subset. Schedule: the recipe's 30 000 × 2.
With `--eval`, each recipe's evaluation but DiffewS's (bench_diffews.py times it) too: the
recipe's prediction of one image at each target's evaluation size (DIFF: the whole image through
the 37-step trajectory; QueryDiff: 512² windows at stride 341; DiGSeg: an ADE20K image squashed to
512², 8 candidate classes (about an image's class count; CLIP's real selection needs the real
weights) and all 150 (`--candidates all`), at E×S 8×2 and 1×1), times the target's validation
images -> hours per evaluation of all targets (a second table); on CUDA DIFF's also as the recipe's `--cuda-graph` replays it (one
graph per image size; the first of the two warm-up calls captures). Sizes: Cityscapes 1024×512 (500 images), BDD100K 1280×720
(1000), Mapillary 680×512 (2000; its 4:3 images), ACDC 960×544 (406), Dark Zurich 960×544 (50).
For DIFF, QueryDiff and DiGSeg a "CUDA graph" row tries `CudaGraphStep` on the recipe's step
after its plain rows are timed (not interleaved with them; a failed capture cannot spoil them);
where capture fails (a host sync in the step) the table says so instead of a time. Each recipe
runs in its own process (a failed capture leaves the CUDA RNG unusable for the rest of its
process); the table is written after every recipe, so a call cut short keeps what it measured.
A recipe's variants are interleaved (A B B A ...; `--rounds` segments of `--iters` steps each),
recipe after recipe (one set of models in memory at a time). Hours on one GPU = schedule samples
/ measured samples per second; several GPUs divide it by their measured scaling (DiffewS: 1.86×
on 2, benchmarks/NOTES.md). The training table leaves evaluation out (`--eval`'s second table;
bench_diffews.py times DiffewS's).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_diffews import cached_posteriors  # noqa: E402
from bench_models import device_name, file_tag, interleaved, load_recipe, profile_kernels, spread, timed, write_table  # noqa: E402

from unet_seg.diffusion import NoiseSchedule  # noqa: E402
from unet_seg.models import SD2_TEXT, SD21, SD_VAE, TINY_SD2, TINY_SD2_TEXT, TINY_VAE, AutoencoderKL, CLIPTextEncoder, UNet  # noqa: E402
from unet_seg.train import CudaGraphCall, CudaGraphStep  # noqa: E402

# (iterations, samples per iteration, what a sample is) of each paper's schedule
SCHEDULES = {"DiffewS": (10_000, 16, "episodes"), "DIFF": (40_000, 1, "crops"), "QueryDiff": (60_000, 4, "crops"), "DiGSeg": (30_000, 2, "images")}
# validation sets: (name, images, (H, W) the recipes evaluate at: `ResizeImage(LAYOUTS[name].scale)` of a typical image)
TARGETS = [("Cityscapes", 500, (512, 1024)), ("BDD100K", 1000, (720, 1280)), ("Mapillary", 2000, (512, 680)), ("ACDC", 406, (544, 960)), ("Dark Zurich", 50, (544, 960))]


def adamw(params, device, graph: bool, lr: float = 1e-5, **kw):
    """The recipes' fused AdamW; for a CUDA graph capturable with the lr a GPU tensor."""
    if graph:
        return torch.optim.AdamW(params, lr=torch.tensor(lr, device=device), fused=True, capturable=True, **kw)
    return torch.optim.AdamW(params, lr=lr, fused=True, **kw)


def graphed(make):
    """make() -> (step, modules, optimizer, inputs: a tuple, or a function drawing fresh ones each
    step); a `CudaGraphStep` of the step captured now -> a zero-argument replay, or why building or
    capturing it failed."""
    try:
        step, modules, opt, inputs = make()
        fresh = inputs if callable(inputs) else lambda: inputs
        g = CudaGraphStep(step, modules, opt)
        g(*fresh())
        return lambda: g(*fresh())
    except Exception as e:  # a host sync in the step: capture is refused
        return f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"


def diffews(args, device, cuda: bool) -> dict:
    recipe = load_recipe("diffews_coco20i")
    unet = UNet(TINY_SD2 if args.tiny else SD21).add_support_conv_in(8).to(device).train()
    vae = AutoencoderKL(TINY_VAE if args.tiny else SD_VAE).to(device, torch.bfloat16 if cuda else torch.float32).eval().requires_grad_(False)
    if cuda:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    forward = torch.compile(unet) if args.compile else unet
    context = torch.randn(1, 77, unet.config.context_dim, device=device)
    n, s = 2, args.size
    q, qm = torch.rand(n, 3, s, s, device=device) * 2 - 1, (torch.rand(n, s, s, device=device) > 0.5).long()
    sp, sm = torch.rand(n, 1, 3, s, s, device=device) * 2 - 1, (torch.rand(n, 1, s, s, device=device) > 0.5).long()
    post = cached_posteriors(vae, q, qm, sp, sm)
    opt = adamw(unet.parameters(), device, False, weight_decay=1e-2)
    fns = {
        "encode every step": lambda: recipe.train_step(forward, unet, vae, context, opt, q, qm, sp, sm),
        "latent cache": lambda: recipe.cached_train_step(forward, unet, context, opt, *post),
    }
    if cuda:
        opt_g = adamw(unet.parameters(), device, True, weight_decay=1e-2)
        fns["encode every step, CUDA graph"] = graphed(lambda: (functools.partial(recipe.train_step, forward, unet, vae, context, opt_g), [forward], opt_g, (q, qm, sp, sm)))
        fns["latent cache, CUDA graph"] = graphed(lambda: (functools.partial(recipe.cached_train_step, forward, unet, context, opt_g), [forward], opt_g, post))
    return {"fns": fns, "batch": n}


def diff(args, device, cuda: bool) -> dict:
    recipe = load_recipe("diff_gta2cs")
    tiny = ["--timesteps", "91", "30", "7", "--trajectory", "7", "30", "91", "120"] if args.tiny else []
    run = recipe.parse_args(["--data-root", tempfile.gettempdir(), "--amp"] + tiny)  # an existing folder, never read
    unet = UNet(TINY_SD2 if args.tiny else SD21).to(device).eval().requires_grad_(False)
    vae = AutoencoderKL(TINY_VAE if args.tiny else SD_VAE).to(device).eval().requires_grad_(False)
    text = CLIPTextEncoder(TINY_SD2_TEXT if args.tiny else SD2_TEXT).to(device).eval()
    if cuda:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if args.compile:  # as the recipe's --compile: the two calls its feature paths make
        unet.forward_with_features, unet.features = recipe.maybe_compile(unet.forward_with_features, True), recipe.maybe_compile(unet.features, True)
    prompt_ids = list(recipe.PROMPTS)
    with torch.no_grad():
        contexts = text(torch.randint(0, 49407, (1 + len(prompt_ids), 77), device=device))
    rev = unet.config.channels[::-1]
    channels = [len(run.timesteps) * 6 * rev[i] for i in recipe.LEVELS]
    frozen = recipe.Frozen(unet, vae, contexts, prompt_ids, NoiseSchedule.sd().to(device), channels)
    dims, fine, embed, groups = ((32, 64, 128), 32, 32, 8) if args.tiny else ((512, 1024, 2048), 256, 256, 32)
    segmenter = recipe.Segmenter(channels, 19, dims, fine, embed, groups, recipe.scaled_dilations(args.size // 4)).to(device).train()
    image = torch.rand(1, 3, args.size, args.size, device=device) * 2 - 1
    label = torch.zeros(1, args.size, args.size, dtype=torch.long, device=device)
    label[:, : args.size // 2] = prompt_ids[0]
    label[:, args.size // 2 :, : args.size // 2] = prompt_ids[1]
    rows = recipe.branch_rows(frozen, label, True, device)  # 2 prompted classes: 4 rows per U-Net call
    opt = adamw(segmenter.parameters(), device, False, lr=6e-5, weight_decay=0.01)
    fns = {"recipe": lambda: recipe.train_step(segmenter, frozen, opt, image, label, rows, True, run)}
    if cuda:
        opt_g = adamw(segmenter.parameters(), device, True, lr=6e-5, weight_decay=0.01)
        step = lambda i, l, *r: recipe.train_step(segmenter, frozen, opt_g, i, l, r, True, run)  # noqa: E731
        later = {"CUDA graph": lambda: (step, [segmenter], opt_g, (image, label, *rows))}

    def evaluation():  # the whole image, the unconditional branch's trajectory, as `evaluate_semantic` calls it; graphed as --cuda-graph
        segmenter.eval()
        rows = [("eager", name, n, size, lambda size=size: recipe.predict_logits(segmenter, frozen, eval_image(size, args, device), run)) for name, n, size in TARGETS]
        if cuda:
            graphs = CudaGraphCall(functools.partial(recipe.unconditional_logits, segmenter, frozen, run))
            rows += [("CUDA graph", name, n, size, lambda size=size: recipe.predict_logits(segmenter, frozen, eval_image(size, args, device), run, graphs))
                     for name, n, size in TARGETS]  # fmt: skip
        return rows

    return {"fns": fns, "batch": 1, "later": later if cuda else {}, "eval": evaluation}


def querydiff(args, device, cuda: bool) -> dict:
    from unet_seg.demo import BlockCodec
    from unet_seg.mask2former import SetLossConfig

    recipe = load_recipe("querydiff_gta2cs")
    rargs = recipe.parse_args(["--demo"] if args.tiny else ["--eval-only", "--no-pretrained", "--data-root", tempfile.gettempdir()])
    backbone = "demo's" if args.tiny else "DINOv2-L + Rein"
    num_classes, size, b = (6 if args.tiny else 19), rargs.size, 4
    if args.tiny:
        unet, vae = UNet(recipe.DEMO_TEACHER).to(device).eval(), BlockCodec().to(device)
    else:
        unet, vae = UNet(SD21).to(device, torch.bfloat16).eval(), AutoencoderKL(SD_VAE).to(device, torch.bfloat16).eval()
    unet.requires_grad_(False), vae.requires_grad_(False)
    context = torch.zeros(1, 2, unet.config.context_dim, device=device)
    teacher = (unet, vae, context, NoiseSchedule.sd().to(device), (recipe.T_WEAK, recipe.T_STRONG))
    x = torch.rand(b, 3, size, size, device=device) * 2 - 1
    labels = torch.randint(0, num_classes, (b, size // 32, size // 32), device=device).repeat_interleave(32, 1).repeat_interleave(32, 2)
    loss_cfg = SetLossConfig(points=rargs.points)
    model = recipe.build_model(rargs, num_classes, True, unet).to(device).train()
    opt = torch.optim.AdamW(recipe.param_groups(model, 1e-4, 0.1), lr=1e-4, fused=True)
    fns = {f"recipe ({backbone})": lambda: recipe.train_step(model, opt, x, labels, num_classes, loss_cfg, 1.0, teacher, amp=True)}
    if cuda:

        def make():
            groups = [{**g, "lr": torch.tensor(g.get("lr", 1e-4), device=device)} for g in recipe.param_groups(model, 1e-4, 0.1)]
            opt_g = torch.optim.AdamW(groups, lr=torch.tensor(1e-4, device=device), fused=True, capturable=True)
            step = lambda xs, ys: recipe.train_step(model, opt_g, xs, ys, num_classes, loss_cfg, 1.0, teacher, amp=True)  # noqa: E731
            return step, [model], opt_g, (x, labels)

    def evaluation():  # slid 512² windows at stride 341 (the release's test_cfg), no diffusion branch
        model.eval()
        score = recipe.scores(model, num_classes, recipe.slide_window(size), amp=True)
        return [("eager", name, n, hw, lambda hw=hw: score(eval_image(hw, args, device))) for name, n, hw in TARGETS[:3]]

    return {"fns": fns, "batch": b, "later": {"CUDA graph": make} if cuda else {}, "eval": evaluation}


def eval_image(size: tuple[int, int], args, device) -> torch.Tensor:
    """One test image [1, 3, H, W] at a target's evaluation size (--tiny: an eighth of each side)."""
    h, w = (max(64, s // 8 // 64 * 64) for s in size) if args.tiny else size
    return torch.rand(1, 3, h, w, device=device) * 2 - 1


def digseg(args, device, cuda: bool) -> dict:
    recipe = load_recipe("digseg_ade20k")
    unet = UNet(TINY_SD2 if args.tiny else SD21)  # SD 2-base: SD 2.1's architecture, ε objective
    vae = AutoencoderKL(TINY_VAE if args.tiny else SD_VAE).to(device).eval().requires_grad_(False)
    null = torch.randn(1, 77, unet.config.context_dim, device=device)
    p = 32 if args.tiny else 1024  # CLIP projection width of the class embeddings
    model = recipe.DiGSeg(unet.widen_conv_in(8), p, null).to(device).train()
    if cuda:
        model.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    params = recipe.set_trainable(model, "all" if args.tiny else "paper")
    schedule = NoiseSchedule.sd("epsilon").to(device)
    b, s = 2, args.size
    images = torch.rand(b, 3, s, s, device=device) * 2 - 1
    with torch.no_grad():
        z_y = vae.encode(torch.rand(b, 3, s, s, device=device) * 2 - 1)
    embeds = torch.randn(b, p, device=device)
    forward = torch.compile(model) if args.compile else model
    opt = adamw(params, device, False, lr=1e-4, weight_decay=1e-2)
    fns = {"recipe": lambda: recipe.train_step(forward, params, vae, schedule, opt, images, z_y, embeds, *recipe.draw_noise(z_y, schedule))}
    if cuda:  # t and the multi-resolution noise drawn outside the graph each step, as the recipe does
        opt_g = adamw(params, device, True, lr=1e-4, weight_decay=1e-2)
        inputs = lambda: (images, z_y, embeds, *recipe.draw_noise(z_y, schedule))  # noqa: E731
        later = {"CUDA graph": lambda: (functools.partial(recipe.train_step, forward, params, vae, schedule, opt_g), [forward], opt_g, inputs)}

    def evaluation():  # one ADE20K image squashed to 512², scored at 682×512: K candidate classes denoised E×S, as `evaluate` does
        model.eval()
        image, class_ids, rules = eval_image((s, s), args, device), torch.arange(150, device=device), {"argmax": None, "τ 0.7": 0.7}
        out = (s, s * 4 // 3)
        embeds = torch.randn(150, p, device=device)

        def segment(k, e_s):
            return lambda: recipe.segment_batch(model, vae, schedule, image, embeds, torch.arange(k, device=device), e_s, out, class_ids, 150, rules)

        return [(f"eager, {k} candidates, E×S {e}×{st}", "ADE20K", 2000, out, segment(k, (e, st))) for k in (8, 150) for e, st in ((8, 2), (1, 1))]

    return {"fns": fns, "batch": b, "later": later if cuda else {}, "eval": evaluation}


BUILDERS = {"DiffewS": diffews, "DIFF": diff, "QueryDiff": querydiff, "DiGSeg": digseg}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="diffews,diff,querydiff,digseg")
    p.add_argument("--size", type=int, default=512, help="DiffewS, DIFF and DiGSeg image side (QueryDiff: its recipe's crop)")
    p.add_argument("--iters", type=int, default=5, help="steps per timed segment")
    p.add_argument("--rounds", type=int, default=4, help="segments per variant, interleaved")
    p.add_argument("--compile", action="store_true", help="DiffewS's, DIFF's and DiGSeg's U-Net compiled, as the recipes' --compile")
    p.add_argument("--eval", action="store_true", help="also time DIFF's, QueryDiff's and DiGSeg's evaluation of each target (a second table)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny configs (smoke test)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--rows", type=Path, help=argparse.SUPPRESS)  # one recipe's rows as JSON, for the parent process
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    wanted = {name.lower(): name for name in BUILDERS}
    names = [wanted[key.strip().lower()] for key in args.recipes.split(",")]
    if len(names) > 1:  # one process per recipe: a failed CUDA-graph capture leaves the CUDA RNG unusable in its process
        rows = []
        evals = []
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, __file__, *sys.argv[1:], "--recipes", name, "--rows", f"{tmp}/rows.json"], check=True)
                got = json.loads(Path(tmp, "rows.json").read_text())
                rows += [tuple(r) for r in got["train"]]
                evals += [tuple(r) for r in got["eval"]]
            write(rows, args, cuda)
            write_eval(evals, args)
        return
    rows, evals = [], []
    for name in names:
        torch.manual_seed(0)
        with torch.device(device):  # weights initialised where they run: seconds instead of a minute at SD's size
            built = BUILDERS[name](args, device, cuda)
        batch = built["batch"]
        fns = {k: f for k, f in built["fns"].items() if callable(f)}
        rows += measure(name, fns, batch, args)
        rows += [(name, variant, batch, why, None) for variant, why in built["fns"].items() if not callable(why)]
        write(rows, args, cuda, evals)
        if args.eval and "eval" in built:  # before any capture: a failed one leaves the CUDA RNG unusable
            with torch.no_grad():
                for variant, target, images, size, fn in built["eval"]():
                    try:
                        ms = timed(fn, args.iters, 2, args.device)
                    except Exception as e:  # a failed capture: say so, keep the eager rows
                        print(f"{name} evaluation, {variant}, {target}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
                        break
                    evals.append((name, variant, target, images, list(size), ms))
                    print(f"{name} evaluation ({variant}), {target} {size[1]}×{size[0]}: {ms:.1f} ms per image", flush=True)
            write(rows, args, cuda, evals)
            write_eval(evals, args)
        for variant, make in built.get("later", {}).items():  # after the plain rows: a failed capture cannot spoil them
            run = graphed(make)
            rows += measure(name, {variant: run}, batch, args) if callable(run) else [(name, variant, batch, run, None)]
            write(rows, args, cuda, evals)
        del built, fns
        if cuda:
            torch.cuda.empty_cache()


def measure(name: str, fns: dict, batch: int, args) -> list:
    """`fns` timed in interleaved rounds, then each profiled for `args.iters` steps on CUDA (the
    share of wall time no kernel runs: the host pacing the GPU) -> table rows (recipe, variant,
    batch, segment ms, GPU idle share or None)."""
    rows = []
    for variant, ms in interleaved(fns, args.rounds, args.iters, 2, args.device).items():
        idle = None
        if args.device.startswith("cuda"):
            prof = profile_kernels(fns[variant], args.iters)
            idle = max(prof["wall_ms"] - prof["kernel_ms"], 0) / prof["wall_ms"]
        rows.append((name, variant, batch, ms, idle))
        print(f"{name} {variant}: {spread(ms)} ms per step of {batch}" + ("" if idle is None else f", GPU idle {idle:.0%}"), flush=True)
    return rows


def write_eval(evals, args) -> None:
    """The evaluation table (recipe, variant, target, images, (H, W), ms per image) into args.out."""
    if args.rows or not evals:
        return
    gpu = device_name(args.device)
    lines, hours = [], {}
    for name, variant, target, images, (h, w), ms in evals:
        hours[name, variant] = hours.get((name, variant), 0.0) + images * ms / 3.6e6
        lines.append(f"| {name} | {variant} | {target} | {w}×{h} | {images} | {ms:.1f} | {images * ms / 3.6e6:.2f} |")
    targets = [(name, variant) for name, variant, *_ in evals]
    lines += [f"| {name} | {variant} | all of them | | | | **{h:.2f}** |" for (name, variant), h in hours.items() if targets.count((name, variant)) > 1]
    table = (
        f"# Evaluation hours — {gpu}\n\n{datetime.date.today()} · torch {torch.__version__} · "
        f"{'tiny configs' if args.tiny else 'real sizes'}, random weights, {'bf16 autocast' if args.device.startswith('cuda') else 'fp32 (CPU)'} · {'compiled' if args.compile else 'eager'} · "
        f"median of {args.iters} calls after 2 warm-up ones · one image per call (DIFF: whole, its trajectory; QueryDiff: "
        "512² windows at stride 341, batched; DiGSeg: K candidate classes of an image squashed to 512², E×S, scored at 682×512)\n\n"
        "| recipe | variant | target | evaluated at | images | ms per image | hours |\n|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    write_table(table, args.out, f"eval_hours_{file_tag(gpu)}{'_compiled' if args.compile else ''}", args.tiny)


def write(rows, args, cuda: bool, evals=()) -> None:
    """The table of `rows` into args.out; a child process (`--rows`) hands its rows (and evaluation
    rows) to its parent instead."""
    if args.rows:
        args.rows.write_text(json.dumps({"train": rows, "eval": list(evals)}))
        return
    gpu = device_name(args.device)
    lines = []
    for name, variant, batch, ms, idle in rows:
        iters, per_iter, unit = SCHEDULES[name]
        if isinstance(ms, str):
            lines.append(f"| {name} | {variant} | {batch} | {ms} | | | {iters:,} × {per_iter} {unit} | |")
            continue
        rate = 1e3 * batch / statistics.median(ms)
        idle = "" if idle is None else f"{idle:.0%}"
        lines.append(f"| {name} | {variant} | {batch} | {spread(ms)} | {idle} | {rate:.2f} | {iters:,} × {per_iter} {unit} | {iters * per_iter / rate / 3600:.1f} |")
    table = (
        f"# GPU hours per paper schedule — {gpu}\n\n{datetime.date.today()} · torch {torch.__version__} · "
        f"{'tiny configs' if args.tiny else 'SD 2.1-sized U-Net, SD VAE'}, random weights · {args.size}² · "
        f"{'bf16 autocast, frozen parts as the recipes keep them' if cuda else 'fp32 (CPU)'} · "
        f"{'U-Nets compiled' if args.compile else 'eager'} · each recipe's variants interleaved in {args.rounds} segments of "
        f"{args.iters} steps · ms: median of segment medians (min–max) · GPU idle: share of a profiled segment's wall time "
        "with no kernel running (host overhead, launch gaps, syncs)\n\n"
        "| recipe | variant | samples/step | ms per step (min–max) | GPU idle | samples/s | paper schedule | hours, one GPU |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    write_table(table, args.out, f"gpu_hours_{file_tag(gpu)}{'_compiled' if args.compile else ''}", args.tiny)


if __name__ == "__main__":
    main()
