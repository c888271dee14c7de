"""The training loop's data order and its Ctrl-C / SIGTERM handling.

    loader = resumable_loader(dataset, batch_size, seed)
    for step, epoch, batch in training_batches(loader, step, steps):   # resumes mid-epoch
        ...
        if should_checkpoint(step, every, steps): save_checkpoint(...)  # also at an interrupt
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from ..errors import TrainingInterrupted
from .distributed import _rank, _world_size, is_main


class ResumableSampler(DistributedSampler):
    """This rank's share of a seeded permutation of the dataset, reshuffled by `set_epoch`, that
    can start part-way into an epoch: `set_epoch(epoch, start)` skips the first `start` of this
    rank's samples without loading them, so a resumed run sees what the interrupted one would
    have. The order depends only on (seed, epoch, rank, world size).
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, drop_last: bool = True):
        super().__init__(
            dataset, num_replicas=_world_size(), rank=_rank(), shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must lie in [0, {self.num_samples}] (samples per rank and epoch), got {start}")
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def resumable_loader(dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True, **kwargs: Any) -> DataLoader:
    """A DataLoader over a `ResumableSampler` (reach it as `loader.sampler`), dropping the last
    incomplete batch, with its own generator so that starting an iterator leaves the global
    torch RNG alone (by default each one draws from it, which a mid-epoch resume would shift).

    Exact resume with `num_workers > 0` also needs augmentations seeded from the sample index
    rather than from the worker's RNG. Worker processes ignore Ctrl-C and SIGTERM (the main
    process stops them): otherwise a Ctrl-C, which reaches the whole process group, kills them
    and the next batch fails before `training_batches` can checkpoint. Other keyword arguments
    go to DataLoader (a `worker_init_fn` runs after that).
    """
    sampler = ResumableSampler(dataset, seed, shuffle=shuffle, drop_last=True)
    generator = torch.Generator().manual_seed(seed)
    if kwargs.get("num_workers", 0) > 0:
        kwargs["worker_init_fn"] = functools.partial(_worker_ignores_signals, kwargs.get("worker_init_fn"))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, generator=generator, **kwargs)


def _worker_ignores_signals(then: Optional[Callable[[int], None]], worker_id: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


def training_batches(loader: DataLoader, step: int, steps: int) -> Iterator[tuple[int, int, Any]]:
    """(step, epoch, batch) for steps `step + 1` … `steps` of a `resumable_loader`, epoch after
    epoch, the first epoch entered part-way when `step` (the steps already done, e.g. a resumed
    checkpoint's) falls inside it. Sets the sampler's epoch and start and, where the dataset has
    one, its `set_epoch` (new augmentations per epoch).

    Ctrl-C or SIGTERM while it runs does not stop the step under way: `should_checkpoint` turns
    true for that step (on every rank), and when the loop body is done this raises
    `TrainingInterrupted` ("interrupted at step N; rerun with --resume"). A second Ctrl-C stops at once."""
    per_epoch = loader.sampler.num_samples // loader.batch_size
    if per_epoch == 0:
        raise ValueError(f"a batch of {loader.batch_size} is more than this rank's {loader.sampler.num_samples} samples")
    with _stop_on_signals():
        while step < steps:
            epoch, offset = divmod(step, per_epoch)
            loader.sampler.set_epoch(epoch, start=offset * loader.batch_size)
            if hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(epoch)
            for batch in loader:
                step += 1
                yield step, epoch, batch
                if interrupted(step):
                    saved = _INTERRUPT.saved.get(step)
                    raise TrainingInterrupted(step, saved, _INTERRUPT.signal_name)
                if step == steps:
                    return


class _Interrupt:
    """Process-wide state of the Ctrl-C / SIGTERM handling (one training loop runs at a time)."""

    requested = False
    signal_name = ""
    checked: tuple[int, bool] = (-1, False)  # (step, the ranks' agreed answer) of the last check
    saved: dict[int, Path] = {}  # step -> checkpoint written at it


_INTERRUPT = _Interrupt()


def _on_signal(signum: int, frame: Any) -> None:
    if _INTERRUPT.requested:
        raise KeyboardInterrupt  # the second one: stop now
    _INTERRUPT.requested, _INTERRUPT.signal_name = True, signal.Signals(signum).name
    if is_main():  # above the progress bar, not into it
        tqdm.write(f"{_INTERRUPT.signal_name}: finishing this step, then writing a checkpoint (again to stop at once)", file=sys.stderr)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM set a flag instead of stopping the process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    _INTERRUPT.requested, _INTERRUPT.checked, _INTERRUPT.saved = False, (-1, False), {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupted(step: int) -> bool:
    """Whether Ctrl-C or SIGTERM reached any rank during `training_batches` (asked once per step:
    a collective the first time each step, so every rank asks at the same steps)."""
    if _INTERRUPT.checked[0] != step:
        stop = _INTERRUPT.requested
        if _world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
            flag = torch.tensor([int(stop)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        _INTERRUPT.checked = (step, stop)
    return _INTERRUPT.checked[1]


def should_checkpoint(step: int, every: int, last: int) -> bool:
    """Save at this step? Every `every` steps, at the `last` step, and at the step an interrupt
    arrived in (`training_batches` stops after it). Call it on every rank, every step."""
    return interrupted(step) or step % every == 0 or step == last
