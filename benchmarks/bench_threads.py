"""CPU demos on a busy machine: training steps/s of the demo's tiny U-Net for each torch thread count
and OpenMP wait policy, alone and beside busy processes, in interleaved rounds.

Each measurement is a fresh process (OpenMP reads OMP_WAIT_POLICY when torch loads), pinned to
--cpus; a competitor is a Python busy loop pinned to the same CPUs, as another job on a shared
machine would be. Prints a markdown table and writes it to --out.

    python benchmarks/bench_threads.py --cpus 0,1 --competitors 0 1 --rounds 2
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(threads: int, seconds: float) -> None:
    """Tiny-U-Net training steps (the DiffewS demo's U-Net: batch 2, latents 16², fp32) for `seconds`."""
    import torch

    torch.set_num_threads(threads)
    from unet_seg.demo import tiny_sd

    torch.manual_seed(0)
    unet = tiny_sd().unet
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    x, t = torch.randn(2, 4, 16, 16), torch.randint(0, 1000, (2,))
    context = torch.randn(2, 77, unet.config.context_dim)

    def step():
        opt.zero_grad()
        unet(x, t, context).square().mean().backward()
        opt.step()

    step()  # warm-up: allocations, first-call dispatch
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    print(f"{n / (time.perf_counter() - start):.3f}")


def measure(threads: int, policy: str, competitors: int, cpus: list[int], seconds: float) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy.startswith("spin="):  # libgomp: spin this many times, then sleep
        env["GOMP_SPINCOUNT"] = policy[len("spin="):]
    elif policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    pin = lambda: os.sched_setaffinity(0, cpus)  # noqa: E731
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pin) for _ in range(competitors)]
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(threads), "--seconds", str(seconds)],
            env=env, preexec_fn=pin, capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return float(out.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", default="0,1", help="CPUs every process is pinned to")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--policies", nargs="+", default=["default", "PASSIVE"],
                   help="OMP_WAIT_POLICY values, or spin=N for GOMP_SPINCOUNT=N (libgomp spins N times, then sleeps)")
    p.add_argument("--competitors", type=int, nargs="+", default=[0, 1], help="busy processes beside the run")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each in the other's reverse order (A B, B A)")
    p.add_argument("--seconds", type=float, default=6.0, help="timed steps per measurement")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child(args.child, args.seconds)

    cpus = [int(c) for c in args.cpus.split(",")]
    configs = list(itertools.product(args.competitors, args.threads, args.policies))
    rates: dict[tuple, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs if r % 2 == 0 else configs[::-1]:
            rates[c].append(measure(c[1], c[2], c[0], cpus, args.seconds))
            print(f"round {r + 1}: {c[0]} busy, {c[1]} thread(s), wait {c[2]}: {rates[c][-1]:.2f} steps/s", flush=True)

    import torch

    lines = [
        f"# CPU contention: tiny-U-Net training steps/s ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, pinned to {cpus}; torch {torch.__version__}; {args.rounds} interleaved rounds of "
        f"{args.seconds:g} s, median)",
        "",
        "| busy processes beside | torch threads | OpenMP wait | steps/s | rounds |",
        "|---|---|---|---|---|",
    ]
    for c in configs:
        lines.append(f"| {c[0]} | {c[1]} | {c[2]} | {statistics.median(rates[c]):.2f} | {', '.join(f'{x:.2f}' for x in rates[c])} |")
    table = "\n".join(lines)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"threads{args.tag}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
