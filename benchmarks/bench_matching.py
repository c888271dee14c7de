"""The set loss's Hungarian matching as QueryDiff's step runs it: all images × prediction steps at
once on the device (`min_cost_assignment`), eager and replayed as a CUDA graph, beside SciPy's
solver on the host (what a host-side matcher costs: copy the costs over, solve each matrix).

    python benchmarks/bench_matching.py                     # CUDA: 4 images × 10 steps, 19 classes, 100 queries
    python benchmarks/bench_matching.py --tiny --device cpu --rounds 2 --iters 2   # smoke test

Costs are uniform random; `--present` of the K classes are marked per image (GTA5 crops hold
about 12 of 19). Interleaved rounds (`--rounds` segments of `--iters` calls each).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_models import device_name, file_tag, interleaved, spread, write_table  # noqa: E402

from unet_seg.matching import min_cost_assignment  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrices", type=int, default=40, help="images × prediction steps (QueryDiff: 4 × 10)")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--present", type=int, default=12, help="classes marked per matrix")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="8 matrices of 6 classes (4 present) and 16 queries (smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.tiny:
        args.matrices, args.classes, args.queries, args.present = 8, 6, 16, 4
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(args.matrices, args.classes, args.queries, generator=g).to(device)
    rows = torch.rand(args.matrices, args.classes, generator=g).argsort(1) < args.present
    rows = rows.to(device)
    fns = {"device, eager": lambda: min_cost_assignment(cost, rows)}
    try:
        from scipy.optimize import linear_sum_assignment

        def host():
            c, r = cost.cpu().double().numpy(), rows.cpu().numpy()  # the copy syncs with the GPU
            return [linear_sum_assignment(c[n][r[n]]) for n in range(len(c))]

        fns["host, SciPy"] = host
    except ImportError:
        print("no SciPy: its row is left out")
    if device.type == "cuda":
        static = torch.cuda.CUDAGraph()
        min_cost_assignment(cost, rows)  # warm-up before capture
        torch.cuda.synchronize()
        with torch.cuda.graph(static):
            captured = min_cost_assignment(cost, rows)
        fns["device, CUDA graph"] = static.replay
        static.replay()
        assert torch.equal(captured, min_cost_assignment(cost, rows))
    times = interleaved(fns, args.rounds, args.iters, 3, args.device)
    name = device_name(args.device)
    lines = [
        f"# Matching {args.matrices} cost matrices [{args.classes} classes ({args.present} present), {args.queries} queries], {name}",
        "",
        f"`python benchmarks/bench_matching.py --device {args.device}`; median of {args.rounds} interleaved segments of {args.iters} calls (min–max).",
        "",
        "| matcher | ms per call |",
        "|---|---|",
        *(f"| {k} | {spread(v)} |" for k, v in times.items()),
    ]
    write_table("\n".join(lines) + "\n", args.out, f"matching_{file_tag(name)}", args.tiny)


if __name__ == "__main__":
    main()
