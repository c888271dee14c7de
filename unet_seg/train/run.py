"""The start and the end of every recipe run (`start_run`, `finish_run`)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from .compute import compile_cache_dir
from .distributed import barrier, cleanup_distributed, init_distributed, print0, print_demo
from .rng import seed_everything
from .report import PathLike, write_metrics


class Run(NamedTuple):
    """This process's place in a recipe run (`start_run`)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    started: float  # time.perf_counter() at the start
    note: str = ""  # printed by finish_run after the metrics: what a short demo cannot show yet


def start_run(args: argparse.Namespace, *, demo: str, real: str) -> Run:
    """Join the processes (`init_distributed`), say plainly on rank 0 what a --demo run is
    (`print_demo`: `"DEMO: <demo>, CPU, no download (real runs: <real>)"`; a CPU demo runs on one
    thread unless OMP_NUM_THREADS is set), seed this rank's own
    stream (`seed_everything(args.seed, rank)`; build models in `same_init_on_every_rank`) and
    create `args.out`. A demo of less than half its default steps (`args.demo_steps`, set by
    `parse_recipe_args`) ends with a line saying that it is too short to show the method. With
    `args.compile` the first line says that compiling takes minutes the first time."""
    started = time.perf_counter()
    rank, world, local_rank, device = init_distributed()
    if getattr(args, "compile", False):  # cold compiles measured on an H100: 2 to 5 min per recipe (benchmarks/NOTES.md)
        print0(f"compiling: about 2-5 min the first time, seconds once cached (in {compile_cache_dir()})")
    cpu = device.type.upper()
    if args.demo and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # A demo's tiny model gains 10% from a second thread on an idle machine and loses 3x to it
        # beside one busy process, 20x on a loaded one (benchmarks/bench_threads.py): one thread.
        torch.set_num_threads(1)
        cpu = "CPU (1 thread; OMP_NUM_THREADS=N for more)"
    print_demo(args, f"{demo}, {cpu}, no download (real runs: {real})")
    seed_everything(args.seed, rank)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return Run(rank, world, local_rank, device, started, _short_demo_note(args))


def _short_demo_note(args: argparse.Namespace) -> str:
    default = getattr(args, "demo_steps", None)
    if not args.demo or default is None or 2 * args.steps >= default:
        return ""
    return (f"note: {args.steps} steps is a short demo (its default is {default}): possibly too short to show the method: its scores "
            "can sit at or below the baseline and control rows; run the default --steps for the comparison the demo is made for")  # fmt: skip


def finish_run(run: Run, metrics: dict, *, out: PathLike, title: str, wrote: str = "", train_seconds: Optional[float] = None) -> dict:
    """The end of every recipe: `metrics` written to `out`/metrics.{md,json} and printed as a
    table, the run's times, then every rank waits for the others and leaves the process group.
    `wrote` names further files written (e.g. "predictions.png"). Returns `metrics`."""
    table = write_metrics(metrics, Path(out) / "metrics", title=title)
    print0("\n" + table)
    times = (f"train {train_seconds:.0f} s, " if train_seconds is not None else "") + f"total {time.perf_counter() - run.started:.0f} s"
    print0(f"{times} on {run.world} process(es); wrote {out}/metrics.md, .json" + (f", {wrote}" if wrote else ""))
    if run.note:
        print0(run.note)
    barrier()
    cleanup_distributed()
    return metrics
