"""A real run's first minutes: train two steps, write a checkpoint and read it back, evaluate one
item of every evaluation set at its full size, project the run's duration, and put everything
back as it was (Lightning's sanity validation and fast_dev_run in one), so that a run that would
fail after hours fails now, with the reason in one line. A demo makes the same check for its
first line, the time it will take on this machine.

    def one_step(batch): ...                            # the training loop's body, as the loop calls it
    sanity_check(args, out=args.out, step=step, loader=loader, train=one_step, models=models,
                 optimizer=opt, scheduler=sched, evaluate=lambda data: evaluate(model, data),
                 targets={"cityscapes": val_set, "bdd100k": ...})
    for step, epoch, batch in training_batches(loader, step, args.steps):
        one_step(batch); ...

The run's result does not depend on it: the weights, optimiser, scheduler and every rank's RNG
states come back from the checkpoint it wrote before training, and the data order from the
loader's sampler, which `training_batches` positions by step.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..cli import _without_worker_traceback
from ..errors import SanityCheckFailed, TrainingInterrupted
from .checkpoints import load_checkpoint, save_checkpoint
from .compute import evaluation
from .distributed import _world_size, all_gather_str, barrier, is_main, print0, unwrap
from .loop import training_batches
from .report import PathLike


DEMO_MIN_STEPS = 10  # a demo shorter than this is not timed: the check would be a good part of it


class SanityReport(NamedTuple):
    seconds: float  # the whole check
    step_seconds: float  # the last training step it timed
    train_seconds: float  # projected: the remaining steps and their checkpoints
    eval_seconds: float  # projected: every item of every evaluation set, shared by the processes


def sanity_check(
    args: Any,
    *,
    out: PathLike,
    step: int,
    loader: torch.utils.data.DataLoader,
    train: Callable[[Any], Any],
    models: dict[str, nn.Module],
    evaluate: Callable[[Dataset], Any],
    targets: dict[str, Dataset],
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    steps: int = 2,
    trainings: int = 1,
) -> Optional[SanityReport]:
    """Before a real run's training loop (after resuming, DDP and compiling), on every rank: write
    `models`, `optimizer`, `scheduler` and the RNG states to `out`/sanity-check (the real atomic
    writer), run `train(batch)` on the loop's next `steps` batches (the first warms up: compiling,
    DDP's buckets; the last is timed), call `evaluate(data)` on the first item of each of `targets`
    (every rank the same item, in eval mode without gradients), read the checkpoint back (the real
    loader: the weights, optimiser, scheduler and RNG states are as they were; checked), delete it,
    and print on rank 0, e.g.

        sanity check passed in 2.1 min (2 training steps, a checkpoint written and read back, one item
        of cityscapes 2048x1024, bdd100k 1280x720); 40000 steps ≈ 5.2 h, evaluation ≈ 24 min on 8 process(es)

    A demo (`args.demo`) prints the projection as its time on this machine instead:

        demo: about 4.2 min on this machine (300 steps ≈ 3.9 min, evaluation ≈ 18 s)

    `trainings`: the trainings of this size the demo has still to run, this one included (a
    recipe that also trains its control model: 2); the estimate counts them all alike.

    Skipped (None) with `args.no_sanity_check`, when no step is left (`step >= args.steps`) and for
    a demo of fewer than DEMO_MIN_STEPS steps. A failure in any part raises SanityCheckFailed on
    every rank naming the part, the rank and the error (`unet_seg.cli.run` prints it as one line,
    exit status 1). `args.steps` and `args.save_every` give the projection."""
    if getattr(args, "no_sanity_check", False) or args.steps - step < (DEMO_MIN_STEPS if args.demo else 1):
        return None
    started, world = time.perf_counter(), _world_size()
    folder = Path(out) / "sanity-check"
    before = _fingerprint(models)
    t0 = time.perf_counter()
    path = _agreed("writing a checkpoint", lambda: save_checkpoint(folder, step, models, optimizer=optimizer, scheduler=scheduler))
    save_seconds = time.perf_counter() - t0

    times: list[float] = []

    def run_steps() -> None:
        t = time.perf_counter()
        for _, _, batch in training_batches(loader, step, min(step + steps, args.steps)):
            train(batch)
            _sync()
            times.append(time.perf_counter() - t)
            t = time.perf_counter()

    _agreed(f"in training step {step + 1} or {step + 2}" if steps > 1 else f"in training step {step + 1}", run_steps)

    eval_seconds, seen = 0.0, []
    for name, data in targets.items():
        item = f"{name} {_size(data[0])}"
        t = time.perf_counter()
        _agreed(f"evaluating one item of {item}", lambda: _evaluate_one(evaluate, data, models, world))
        eval_seconds += (time.perf_counter() - t) * -(-len(data) // world)
        seen.append(item)

    def restore() -> None:
        load_checkpoint(path, models, optimizer=optimizer, scheduler=scheduler)
        if not all(torch.equal(a, b) for a, b in zip(before, _fingerprint(models))):
            raise RuntimeError(f"the weights read back from {path} differ from those written")

    _agreed("reading the checkpoint back", restore)
    barrier()
    if is_main():
        shutil.rmtree(folder, ignore_errors=True)

    left = args.steps - step
    train_seconds = left * times[-1] + (left // args.save_every + 1) * save_seconds
    report = SanityReport(time.perf_counter() - started, times[-1], train_seconds, eval_seconds)
    if args.demo:
        this = f"{left} steps ≈ {_duration(train_seconds)}, evaluation ≈ {_duration(eval_seconds)}"
        this = f"this training: {this}; {trainings} trainings in all" if trainings > 1 else this
        print0(f"demo: about {_duration(trainings * (train_seconds + eval_seconds))} on this machine ({this})")
        return report
    print0(
        f"sanity check passed in {_duration(report.seconds)} ({len(times)} training step{'s' * (len(times) > 1)}, "
        f"a checkpoint written and read back, one item of {', '.join(seen)}); "
        f"{left} steps ≈ {_duration(train_seconds)}, evaluation ≈ {_duration(eval_seconds)} on {world} process(es)"
    )
    return report


def _agreed(what: str, fn: Callable[[], Any]) -> Any:
    """fn() on every rank, then every rank learns whether any failed (a collective) and, if one
    did, raises SanityCheckFailed naming `what`, the first failing rank and its error."""
    error, result, cause = "", None, None
    try:
        result = fn()
    except (KeyboardInterrupt, TrainingInterrupted):
        raise
    except Exception as e:  # noqa: BLE001 -- every failure is reported, in one line
        error, cause = " ".join(f"{type(e).__name__}: {_without_worker_traceback(str(e))}".split()), e
    failed = [(r, e) for r, e in enumerate(all_gather_str(error)) if e]
    if failed:
        rank, message = failed[0]
        where = f" on rank {rank}" if _world_size() > 1 else ""
        raise SanityCheckFailed(f"sanity check failed {what}{where}: {message} (--no-sanity-check skips the check)") from cause
    return result


def _evaluate_one(evaluate: Callable[[Dataset], Any], data: Dataset, models: dict[str, nn.Module], world: int) -> None:
    """`evaluate` on the first item of `data`, the same item on every rank (each rank's
    `rank_share` of `world` copies is one copy): a failure then happens on all ranks alike."""
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(evaluation(model))
        evaluate(Subset(data, [0] * world))


def _fingerprint(models: dict[str, nn.Module]) -> list[torch.Tensor]:
    """Per tensor of every model's state dict, its float64 sum and sum of squares (on its device)."""
    sums = []
    for model in models.values():
        for value in unwrap(model).state_dict().values():
            v = value.detach().double()
            sums.append(torch.stack([v.sum(), v.square().sum()]))
    return sums


def _size(item: Any) -> str:
    """"HxW" of the first image-like tensor (3 or more dimensions) of a dataset item."""
    tensors = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else [item]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.ndim >= 3:
            return f"{t.shape[-1]}x{t.shape[-2]}"
    return "(no image)"


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
