"""DiffewS training throughput on 1 and N GPUs of one host (DDP over NCCL), and the recipe's
rank-sharded evaluation on each: the same metrics whatever the number of GPUs.

    torchrun --nproc_per_node=1 benchmarks/bench_diffews_ddp.py --out /tmp/ddp    # one GPU
    torchrun --nproc_per_node=2 benchmarks/bench_diffews_ddp.py --out /tmp/ddp    # two GPUs
    python benchmarks/bench_diffews_ddp.py --compare /tmp/ddp                     # the table
    torchrun --nproc_per_node=2 benchmarks/bench_diffews_ddp.py --cuda-graph --tag graph --out /tmp/ddp  # a variant
    torchrun --nproc_per_node=2 benchmarks/bench_diffews_ddp.py --tiny --steps 2 --out /tmp/ddp   # CPU smoke (gloo)

Each run sets up as `recipes/diffews_coco20i.py` does on a GPU (SD2.1 U-Net with conv_in 8,
fp32 weights under bf16 autocast, frozen SD VAE in bf16, channels_last, the U-Net DDP-wrapped
when world > 1 and compiled as `--compile` does, the VAE's encoder and decoder compiled, fused
AdamW) and times the recipe's `train_step` at its per-GPU batch (`--batch-size`, 2 episodes,
1-shot) on random weights and random episodes already on the GPU (so the data loader is out of the
measurement): the first step (compile), `--warmup` steps, then `--steps` timed steps between
barriers. Episodes/s counts all ranks. Then it restores the initial weights and runs the recipe's
`evaluate` (each rank takes episodes rank, rank + world, ...; confusion matrices all-reduced) on
`--eval-items` synthetic 1-shot episodes, and rank 0 writes `world<N>.json`. `--compare` reads
them: 2-GPU speed-up over one GPU, and whether the metrics and confusion matrices are identical.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_models import device_name, load_recipe, write_table  # noqa: E402

from unet_seg.data.synthetic import CLASS_NAMES, FewShotEpisodes, fold_split  # noqa: E402
from unet_seg.metrics import few_shot_scores  # noqa: E402
from unet_seg.models import SD21, SD_VAE, TINY_SD2, TINY_VAE, AutoencoderKL, UNet  # noqa: E402
from unet_seg.train import (  # noqa: E402
    CudaGraphStep, barrier, check_finite_everywhere, cleanup_distributed, ddp, init_distributed, maybe_compile, print0,
)


def run(args) -> None:
    recipe = load_recipe("diffews_coco20i")
    rank, world, _, device = init_distributed()
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    with torch.device(device):  # initialised on the GPU: seconds instead of a minute
        unet = UNet(TINY_SD2 if args.tiny else SD21).add_support_conv_in(8).train()
        vae = AutoencoderKL(TINY_VAE if args.tiny else SD_VAE).to(torch.bfloat16 if cuda else torch.float32)
    vae.eval().requires_grad_(False)
    if cuda:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    context = torch.randn(1, 77, unet.config.context_dim, device=device)
    initial = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    lr = torch.tensor(3e-5, device=device) if args.cuda_graph else 3e-5
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, fused=True, capturable=args.cuda_graph)
    model = unet
    if world > 1:
        model = ddp(unet, gradient_as_bucket_view=args.bucket_view, bucket_cap_mb=args.bucket_mb, static_graph=args.static_graph)
        if args.bf16_grads:  # gradients rounded to bf16 for the all-reduce: half the traffic, not bit-identical
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

            model.register_comm_hook(None, bf16_compress_hook)
    forward = maybe_compile(model, cuda and not args.no_compile)
    if cuda and not args.no_compile:
        vae.encoder.compile()
        vae.decoder.compile()

    g = torch.Generator(device).manual_seed(1000 + rank)  # each rank its own episodes
    b, s = args.batch_size, args.size

    def episodes():
        query = torch.rand(b, 3, s, s, generator=g, device=device) * 2 - 1
        supports = torch.rand(b, 1, 3, s, s, generator=g, device=device) * 2 - 1
        masks = (torch.rand(b, 1, s, s, generator=g, device=device) > 0.5).long()
        query_mask = (torch.rand(b, s, s, generator=g, device=device) > 0.5).long()
        return query, query_mask, supports, masks

    batches = [episodes() for _ in range(4)]

    train = functools.partial(recipe.train_step, forward, unet, vae, context, opt)
    if args.cuda_graph:
        train = CudaGraphStep(train, [forward], opt)

    def step(i: int) -> None:  # as the recipe's loop: the step, then the loss read on every rank
        check_finite_everywhere(train(*batches[i % len(batches)]), "latent MSE")

    def synced() -> float:
        if cuda:
            torch.cuda.synchronize()
        barrier()
        return time.perf_counter()

    t0 = synced()
    step(0)
    first = synced() - t0
    print0(f"world {world}: first step (compile) {first:.1f} s")
    for i in range(args.warmup):
        step(i)
    t0 = synced()
    for i in range(args.steps):
        step(i)
    seconds = synced() - t0
    eps = world * b * args.steps / seconds
    tag = f" ({args.tag})" if args.tag else ""
    print0(f"world {world}{tag}: {args.steps} steps of {b} episodes per GPU in {seconds:.2f} s: {eps:.2f} episodes/s")
    if args.profile and cuda:  # every rank steps (DDP's all-reduce needs them all); rank 0 reports
        from bench_models import flops_of, profile_kernels, profile_table

        prof = profile_kernels(lambda: step(0), 3)
        tflop = flops_of(lambda: recipe.train_step(unet, unet, vae, context, opt, *batches[0])) / 1e12  # no DDP: no collective
        if rank == 0:
            print(profile_table(f"training step, {b} episodes, world {world}{tag}, rank 0", prof, tflop), flush=True)
    if args.cuda_graph:
        train.close()  # before the process group goes: a live graph holding NCCL calls hangs destroy_process_group
    if args.eval_items == 0:
        barrier()
        cleanup_distributed()
        return

    unet.load_state_dict(initial)  # evaluate the same weights whatever the world size
    classes = fold_split(0)[1]
    data = FewShotEpisodes(1, args.eval_items, classes, shots=1, size=s)
    t0 = synced()
    conf, _ = recipe.evaluate(unet, data, vae=vae, context=context[:, :2], num_labels=len(CLASS_NAMES), device=device, seed=0)  # unpadded, as the recipe
    eval_seconds = synced() - t0
    metrics = {name: few_shot_scores(c, classes) for name, c in conf.items()}
    print0(f"world {world}: evaluation of {len(data)} episodes in {eval_seconds:.1f} s: {metrics}")
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = {
            "world": world, "tag": args.tag, "device": device_name(device.type), "torch": torch.__version__, "batch_per_gpu": b,
            "steps": args.steps, "seconds": seconds, "episodes_per_s": eps, "first_step_s": first,
            "eval_episodes": len(data), "eval_seconds": eval_seconds, "metrics": metrics,
            "confusion": {name: c.cpu().tolist() for name, c in conf.items()},
        }  # fmt: skip
        (out / f"world{world}{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(result, indent=1))
    barrier()
    cleanup_distributed()


def compare(folder: Path, tiny: bool) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("world*.json"))]
    ones = {r.get("tag", ""): r for r in runs if r["world"] == 1}
    if not ones or len(runs) < 2:
        raise SystemExit(f"{folder}: need a world1*.json and at least one more world*.json, found {len(runs)} runs")
    first = ones[sorted(ones)[0]]  # the metrics every run must reproduce (the same initial weights)
    lines = []
    for r in sorted(runs, key=lambda r: (r.get("tag", ""), r["world"])):
        one = ones.get(r.get("tag", ""))
        speedup = f"{r['episodes_per_s'] / one['episodes_per_s']:.2f}×" if one else "–"
        lines.append(
            f"| {r.get('tag') or '–'} | {r['world']} | {r['batch_per_gpu']} | {r['episodes_per_s']:.2f} | {speedup} | "
            f"{r['first_step_s']:.0f} | {r['metrics']['DiffewS']['mIoU']:.2f} / {r['metrics']['DiffewS']['FB-IoU']:.2f} | "
            f"{'yes' if r['metrics'] == first['metrics'] else 'NO'} | {'yes' if r['confusion'] == first['confusion'] else 'NO'} | "
            f"{r['eval_seconds']:.1f} |"
        )
    table = (
        f"# DiffewS training on 1 and {max(r['world'] for r in runs)} GPUs (DDP, NCCL) — {first['device']}\n\n"
        f"{datetime.date.today()} · torch {first['torch']} · SD2.1 U-Net (conv_in 8) + SD VAE bf16, random weights, 1-shot "
        f"episodes at the recipe's per-GPU batch, {first['steps']} timed steps after warm-up · speed-up: over the "
        f"1-GPU run of the same variant · evaluation: the recipe's rank-sharded `evaluate` on {first['eval_episodes']} "
        "synthetic 1-shot episodes with the initial weights, compared with the first 1-GPU run\n\n"
        "| variant | GPUs | episodes/GPU/step | episodes/s | speed-up | first step s | eval mIoU / FB-IoU | same metrics | same confusion | eval s |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    write_table(table, str(folder), "diffews_ddp", tiny)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=2, help="episodes per GPU and step (the recipe's 2)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eval-items", type=int, default=32, help="a multiple of 8 x world keeps every batch at 8")
    p.add_argument("--no-compile", action="store_true", help="eager U-Net and VAE")
    p.add_argument("--profile", action="store_true", help="rank 0: kernel families of a training step")
    p.add_argument("--bucket-view", action="store_true", help="DDP gradient_as_bucket_view: gradients live in the buckets (no copy)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket_cap_mb (torch's default 25)")
    p.add_argument("--static-graph", action="store_true", help="DDP static_graph")
    p.add_argument("--cuda-graph", action="store_true", help="each step one CUDA graph, all-reduces included (the recipe's --cuda-graph)")
    p.add_argument("--bf16-grads", action="store_true", help="all-reduce gradients in bf16 (bf16_compress_hook; changes numerics)")
    p.add_argument("--tag", default="", help="names this variant's result file world<N>-<tag>.json")
    p.add_argument("--tiny", action="store_true", help="tiny configs (smoke test)")
    p.add_argument("--out", default="benchmarks/results/ddp", help="where world<N>.json go")
    p.add_argument("--compare", type=Path, help="read world*.json in this folder and write the table")
    args = p.parse_args()
    if args.compare:
        compare(args.compare, args.tiny)
    else:
        run(args)


if __name__ == "__main__":
    main()
