"""What every recipe needs around its training loop: processes, seeds, checkpoints, progress.

The loop the four recipes run (recipes/*.py `main`):

    args = parse_recipe_args(recipe_parser(__doc__, DEMO, REAL, out="runs/x"), argv, DEMO, REAL)  # unet_seg.cli
    run = start_run(args, demo="tiny random models, synthetic scenes", real="--model <SD 2.x> --data-root ...")
    sd = demo.tiny_sd() if args.demo else load_sd(args.model)  # rank, world, device: run.rank, ...
    model, opt, sched = ..., ..., ...
    models = {"head": model}                                   # what training changes
    step = resume_latest(args.out, models, optimizer=opt, scheduler=sched) if args.resume else 0
    forward = wrap_for_training(model, compile=args.compile)   # DDP with several processes, then compile
    loader = resumable_loader(dataset, args.batch_size, args.seed)
    bar = progress(total=args.steps, initial=step)
    for step, epoch, batch in training_batches(loader, step, args.steps):
        with autocast(run.device):
            loss = check_finite_everywhere(loss_fn(forward(batch["image"]), batch["label"]), "loss")
        ...; bar.update()
        if should_checkpoint(step, args.save_every, args.steps):  # and at the step Ctrl-C / SIGTERM came
            save_checkpoint(args.out, step, models, optimizer=opt, scheduler=sched, epoch=epoch, keep_last=2)
    conf, shown = evaluate_semantic(predict, test_data, ...)   # each rank its `rank_share`
    return finish_run(run, {"mIoU": miou}, out=args.out, title="...")  # table, times, barrier, cleanup

Collectives (`save_checkpoint`, `check_finite_everywhere`, `barrier`) must be called by every
rank; only rank 0 writes files. Checkpoints are safetensors only: tensors as tensors, everything
else (optimizer hyper-parameters, scheduler state, counters, RNG states) as JSON in the header.
Resuming is exact (bit for bit on the same hardware and world size) when the data order comes
from `resumable_loader` and the loss draws randomness only from the global RNGs restored here.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, TypeVar, Union

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from .errors import TrainingInterrupted
from .hub import CheckpointError, atomic_path, check_state_dict
from .losses import check_finite

F = TypeVar("F", bound=Callable)
PathLike = Union[str, os.PathLike]

CHECKPOINT_FORMAT = "unet_seg.checkpoint/1"
CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.safetensors$")


# ---------------------------------------------------------------- processes


def init_distributed() -> tuple[int, int, int, torch.device]:
    """(rank, world_size, local_rank, device) of this process.

    Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) this joins the process
    group: NCCL with one GPU per process (cuda:LOCAL_RANK) when CUDA is available, else gloo on
    CPU. A plain `python x.py` is rank 0 of 1 on cuda:0 or CPU, with no process group.
    Calling it again returns the same values.
    """
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return rank, world_size, local_rank, device


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without a process group."""
    return _rank(), _world_size()


def rank_share(data: Dataset) -> Subset:
    """This rank's share of `data` for evaluation: items rank, rank + world, rank + 2·world, ..."""
    rank, world = rank_and_world()
    return Subset(data, range(rank, len(data), world))


def head(data: Dataset, n: int) -> Subset:
    """The first min(n, len(data)) items of `data` (a quick or shortened evaluation)."""
    return Subset(data, range(min(n, len(data))))


def is_main() -> bool:
    """True on rank 0, and in a process without a process group."""
    return _rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if _world_size() > 1:
        dist.barrier()


def cleanup_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args: Any, **kwargs: Any) -> None:
    """`print` on rank 0 only (flushed, so logs of several processes interleave sensibly)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def print_demo(args: Any, what: str) -> None:
    """For a demo run (`args.demo`), on rank 0: why it is a demo, unless --demo asked for it
    (`args.demo_reason`, set by `unet_seg.cli.parse_recipe_args`), then "DEMO: <what>"."""
    if args.demo:
        print0((f"{args.demo_reason}\n" if args.demo_reason else "") + f"DEMO: {what}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel and torch.compile wrappers (in any nesting)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------- randomness


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python `random`, numpy's global RNG and torch (CPU and every CUDA device) with
    `seed + rank`.

    The per-rank offset gives each process its own noise, timesteps and augmentations; the data
    order (`resumable_loader`) and model initialisation do not depend on it (the sampler takes
    the shared `seed`, and DDP broadcasts rank 0's weights when it wraps the model).
    """
    if seed < 0 or rank < 0:
        raise ValueError(f"seed and rank must be >= 0, got seed={seed}, rank={rank}")
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    if is_main():
        print(f"\n{_INTERRUPT.signal_name}: finishing this step, then writing a checkpoint (again to stop at once)",
              file=sys.stderr, flush=True)  # fmt: skip


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


def _rng_state() -> dict:
    """This process's global RNG states as JSON-able data."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": (
            base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
            if torch.cuda.is_available()
            else None
        ),
    }


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))


def _bytes_tensor(b64: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)


def _all_gather_str(s: str) -> list[str]:
    """Every rank's `s`, in rank order (a collective: all ranks call it). Strings travel as
    padded uint8 tensors, so nothing is pickled."""
    world_size = _world_size()
    if world_size == 1:
        return [s]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.frombuffer(bytearray(s.encode()), dtype=torch.uint8).to(device)
    length = torch.tensor([data.numel()], device=device)
    lengths = [torch.empty_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    lengths_int = [int(n) for n in lengths]
    padded = torch.zeros(max(lengths_int), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return [t[:n].cpu().numpy().tobytes().decode() for t, n in zip(gathered, lengths_int)]


# ---------------------------------------------------------------- files


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------- checkpoints


class Resumed(NamedTuple):
    step: int
    epoch: int
    extra: dict


def _pack(obj: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """A nested structure as JSON: tensors move to `tensors` under their path `key` and leave a
    reference; dicts, lists and tuples are tagged so that they come back as they were (dict keys
    may be str or int, as in `optimizer.state_dict()`)."""
    if isinstance(obj, Tensor):
        if key in tensors:
            raise ValueError(f"two tensors would be stored under {key!r}")
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"{key}: dict keys must be str or int to be stored, got {type(k).__name__}")
        return {"dict": [[k, _pack(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_pack(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
        return {"tuple" if isinstance(obj, tuple) else "list": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"{key}: cannot store a {type(obj).__name__} in a checkpoint "
        "(tensors, numbers, strings, None, and dicts, lists and tuples of them)"
    )


def _unpack(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if not isinstance(obj, dict):
        return obj
    [(tag, value)] = obj.items()
    if tag == "tensor":
        return tensors[value]
    if tag == "dict":
        return {k: _unpack(v, tensors) for k, v in value}
    items = [_unpack(v, tensors) for v in value]
    return tuple(items) if tag == "tuple" else items


def checkpoint_path(directory: PathLike, step: int) -> Path:
    """`directory/step_000001000.safetensors`: the name `save_checkpoint` gives step 1000."""
    return Path(directory) / f"step_{step:09d}.safetensors"


def _checkpoints(directory: PathLike) -> list[Path]:
    """The `step_*.safetensors` files in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """The checkpoint of the highest step in `directory`, or None if there is none."""
    found = _checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(
    directory: PathLike,
    step: int,
    models: dict[str, nn.Module],
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    epoch: int = 0,
    extra: Optional[dict] = None,
    keep_last: Optional[int] = None,
) -> Path:
    """Write `checkpoint_path(directory, step)` atomically (rank 0) and return its path.

    Call it on every rank: each rank's RNG states are gathered so that all of them resume
    exactly; the ranks wait for the file before returning. Stored: each model's state dict
    (unwrapped from DDP/compile, under `model/<name>/`), the optimizer and scheduler state dicts,
    `step`, `epoch`, `extra` (JSON-able values and tensors, e.g. the run's arguments or the best
    metric so far) and the RNG states. Pass only the modules that training changes. With
    `keep_last=N`, older `step_*.safetensors` files in `directory` beyond the newest N are deleted.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    rng = [json.loads(s) for s in _all_gather_str(json.dumps(_rng_state()))]
    path = checkpoint_path(directory, step)
    if is_main():
        tensors: dict[str, Tensor] = {}
        for name, model in models.items():
            for key, value in unwrap(model).state_dict().items():
                tensors[f"model/{name}/{key}"] = value.detach().cpu().contiguous()
        header = {
            "step": step,
            "epoch": epoch,
            "models": list(models),
            "optimizer": _pack(optimizer.state_dict(), "optimizer", tensors) if optimizer is not None else None,
            "scheduler": _pack(scheduler.state_dict(), "scheduler", tensors) if scheduler is not None else None,
            "extra": _pack(extra or {}, "extra", tensors),
            "rng": rng,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "state": json.dumps(header)})
        if keep_last is not None:
            for old in _checkpoints(directory)[:-keep_last]:
                old.unlink()
    barrier()
    _INTERRUPT.saved[step] = path
    return path


def load_checkpoint(
    path: Optional[PathLike],
    models: dict[str, nn.Module],
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    restore_rng: bool = True,
) -> Resumed:
    """Restore what `save_checkpoint` stored into `models` (same names), the optimizer and the
    scheduler (when given), and this rank's RNG states; return (step, epoch, extra).

    Every rank reads the file. A missing, truncated or corrupt file, a missing model, optimizer
    or scheduler state, and a state dict that does not fit (keys listed) raise CheckpointError
    naming the file. Resumed with a different world size, the RNG states are not restored (a
    warning says so): training continues, but not bit for bit.
    """
    if path is None or not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        header = json.loads(metadata["state"]) if metadata.get("format") == CHECKPOINT_FORMAT else None
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from e
    if header is None:
        raise CheckpointError(f"{path}: a safetensors file, but not a unet_seg training checkpoint")

    missing = sorted(models.keys() - set(header["models"]))
    if missing:
        raise CheckpointError(f"{path}: no state for model(s) {missing}; it holds {header['models']}")
    for name, model in models.items():
        model = unwrap(model)
        prefix = f"model/{name}/"
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        check_state_dict(model.state_dict(), state, f"{path} (model {name!r})")
        model.load_state_dict(state)
    for what, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if header[what] is None:
            raise CheckpointError(f"{path}: holds no {what} state")
        try:
            obj.load_state_dict(_unpack(header[what], tensors))
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: the {what} state does not fit ({e})") from e
    if restore_rng:
        if len(header["rng"]) == _world_size():
            _set_rng_state(header["rng"][_rank()])
        else:
            warnings.warn(
                f"{path} was written by {len(header['rng'])} process(es), this run has {_world_size()}: "
                "RNG states not restored, so the resumed run will not match an uninterrupted one bit for bit"
            )
    return Resumed(header["step"], header["epoch"], _unpack(header["extra"], tensors))


def resume_latest(
    directory: PathLike,
    models: dict[str, nn.Module],
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
) -> int:
    """--resume: the steps done by the latest usable checkpoint in `directory`, restored into
    `models`, the optimizer and the scheduler (`load_checkpoint`). Where there is none it says
    so ("starting from step 0") and returns 0. A checkpoint that cannot be used (corrupt,
    truncated, not fitting) is passed over for the one before it with a warning naming it; when
    none can be used, CheckpointError names them all and says what to delete."""
    found = _checkpoints(directory)[::-1]
    if not found:
        print0(f"--resume: no checkpoint in {directory}; starting from step 0")
        return 0
    bad = []
    for path in found:
        try:
            step = load_checkpoint(path, models, optimizer=optimizer, scheduler=scheduler).step
        except CheckpointError as e:
            bad.append(path)
            if is_main():
                warnings.warn(f"--resume: passing over {path}, which cannot be used: {e}", stacklevel=2)
            continue
        print0(f"resumed {path} (step {step})" + (f"; passed over {len(bad)} newer unusable checkpoint(s)" if bad else ""))
        return step
    raise CheckpointError(
        f"--resume: none of the {len(bad)} checkpoint(s) in {directory} can be used (warnings above say why): "
        f"delete {', '.join(p.name for p in bad)} to start from step 0, or give another --out"
    )


# ---------------------------------------------------------------- loop helpers


def progress(iterable: Any = None, **kwargs: Any) -> Union[tqdm, "LineProgress"]:
    """A tqdm bar on rank 0 when stderr is a terminal; where it is not (a log file, a pipe, a
    cluster job), a `LineProgress` that prints a plain line every `every` steps (default: a
    twentieth of `total`) or minute instead. Silent on other ranks. Keyword arguments go to tqdm
    (`total`, `initial`, `desc`, ...)."""
    if not is_main() or kwargs.get("disable"):
        return tqdm(iterable, **{**kwargs, "disable": True})
    if not sys.stderr.isatty():
        return LineProgress(iterable, **kwargs)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


class LineProgress:
    """tqdm's `update`, `set_postfix`, `close` and iteration, written as plain lines for logs:

        DiffewS: step 100/300 | loss=0.0812 shots=1 | 2.41 steps/s | ETA 1:23

    A line is due every `every` steps (default total // 20), after `seconds` without one, and at
    the last step; it is printed once that step's postfix is set (or at the next update/close)."""

    def __init__(self, iterable: Any = None, total: Optional[int] = None, initial: int = 0, desc: str = "",
                 every: Optional[int] = None, seconds: float = 60.0, file: Any = None, **_: Any):  # fmt: skip
        self.iterable, self.desc, self.n, self.initial = iterable, desc, initial, initial
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.every = every or max(1, (self.total or 20) // 20)
        self.seconds, self.file = seconds, file
        self.postfix, self.due = "", False
        self.started = self.last_line = time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update()
            self._flush()
        self.close()

    def update(self, n: int = 1) -> None:
        self._flush()
        self.n += n
        now = time.perf_counter()
        self.due = self.n % self.every == 0 or self.n == self.total or now - self.last_line >= self.seconds

    def set_postfix(self, ordered_dict: Optional[dict] = None, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())
        self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self.due:
            return
        self.due, self.last_line = False, time.perf_counter()
        done = self.n - self.initial
        rate = done / max(self.last_line - self.started, 1e-9)
        parts = [f"{self.desc + ': ' if self.desc else ''}step {self.n}" + (f"/{self.total}" if self.total else "")]
        parts += [self.postfix] if self.postfix else []
        parts.append(f"{rate:.3g} steps/s")
        if self.total and rate > 0:
            eta = int((self.total - self.n) / rate)
            parts.append(f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}" if eta >= 3600 else f"ETA {eta // 60}:{eta % 60:02d}")
        print(" | ".join(parts), file=self.file or sys.stderr, flush=True)


def check_finite_everywhere(loss: Tensor, name: str) -> Tensor:
    """`losses.check_finite` agreed over all ranks: if the loss is NaN or inf on any rank, every
    rank raises FloatingPointError, instead of the healthy ones hanging in the next all-reduce.
    A collective and a device sync: call it on every rank, outside compiled code; the loss must
    live on the process group's device (CUDA for NCCL)."""
    if _world_size() == 1:
        return check_finite(loss, name)
    finite = torch.isfinite(loss.detach()).all().to(torch.int32)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        check_finite(loss, name)  # raises here, with the values, on the rank that went bad
        raise FloatingPointError(f"{name} is not finite on another rank")
    return loss


def compile_cache_dir() -> Path:
    """The folder of torch.compile's on-disk caches (Inductor's compiled graphs, AOTAutograd's,
    the Triton kernels), made this process's: $TORCHINDUCTOR_CACHE_DIR when set, else
    ~/.cache/unet_seg/torchinductor (under $XDG_CACHE_HOME when set). torch's own default lies in
    /tmp, which a reboot or a fresh container empties; here the first run on a machine compiles
    cold and later runs load what it compiled (warm; benchmarks/NOTES.md has both times)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "unet_seg" / "torchinductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def maybe_compile(fn: F, enabled: Optional[bool] = None, **compile_kwargs: Any) -> F:
    """`torch.compile(fn, **compile_kwargs)` when `enabled`, with the on-disk caches in
    `compile_cache_dir()`; by default (None) only when CUDA is available, so CPU runs and CI stay
    eager unless they ask. A compiled module's state dict gains an `_orig_mod.` prefix:
    checkpoints here store `unwrap(model)` and need no care."""
    if enabled is None:
        enabled = torch.cuda.is_available()
    if not enabled:
        return fn
    compile_cache_dir()
    return torch.compile(fn, **compile_kwargs)


def autocast(device: Union[str, torch.device], enabled: Optional[bool] = None, dtype: torch.dtype = torch.bfloat16):
    """`torch.autocast` to bf16 (default), on by default on CUDA and off elsewhere; `enabled=True`
    turns it on for CPU too. Use as `with autocast(device): loss = ...`; compiles without breaks."""
    device = torch.device(device)
    if enabled is None:
        enabled = device.type == "cuda"
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


# ---------------------------------------------------------------- results


def _json_value(value: Any, where: str) -> Any:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {where}: a tensor must hold one value, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; an IoU of an absent class is NaN
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"metric {where}: expected a number, string, None or one-element tensor, got {type(value).__name__}"
    )


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_metrics(metrics: dict[str, Any], path: PathLike, title: Optional[str] = None) -> str:
    """Write `metrics` to `path`.json and `path`.md (rank 0 only; each file atomically) and
    return the markdown table (every rank), for printing.

    `metrics` is flat, {"mIoU": 51.2, "FB-IoU": 70.1}: a two-column table; or one level nested,
    {"ours": {"mIoU": 51.2}, "baseline": {"mIoU": 12.0}}: one row per key, one column per inner
    key. Values: numbers, strings, None, one-element tensors; NaN and inf become null / "–".
    """
    if not isinstance(metrics, dict) or not metrics:
        raise ValueError(f"metrics must be a non-empty dict, got {metrics!r}")
    nested = all(isinstance(v, dict) for v in metrics.values())
    if nested:
        table = {row: {col: _json_value(v, f"{row}/{col}") for col, v in cols.items()} for row, cols in metrics.items()}
        columns = list(dict.fromkeys(col for cols in table.values() for col in cols))
        lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {row} | " + " | ".join(_cell(cols.get(c)) for c in columns) + " |" for row, cols in table.items()]
    else:
        table = {name: _json_value(v, name) for name, v in metrics.items()}
        lines = ["| metric | value |", "|---|---|"] + [f"| {name} | {_cell(v)} |" for name, v in table.items()]
    markdown = (f"## {title}\n\n" if title else "") + "\n".join(lines) + "\n"
    if is_main():
        path = Path(path)
        _atomic_write_text(path.with_name(path.name + ".md"), markdown)
        _atomic_write_text(path.with_name(path.name + ".json"), json.dumps(table, indent=2) + "\n")
    return markdown


# ---------------------------------------------------------------- the recipe runtime


class Run(NamedTuple):
    """This process's place in a recipe run (`start_run`)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    started: float  # time.perf_counter() at the start


def start_run(args: argparse.Namespace, *, demo: str, real: str) -> Run:
    """Join the processes (`init_distributed`), say plainly on rank 0 what a --demo run is
    (`print_demo`: "DEMO: <demo>, CPU, no download (real runs: <real>)"), seed this rank
    (`seed_everything(args.seed, rank)`) and create `args.out`."""
    started = time.perf_counter()
    rank, world, local_rank, device = init_distributed()
    print_demo(args, f"{demo}, {device.type.upper()}, no download (real runs: {real})")
    seed_everything(args.seed, rank)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return Run(rank, world, local_rank, device, started)


def load_latest(directory: PathLike, models: dict[str, nn.Module]) -> None:
    """Evaluation only: the latest checkpoint's weights (and this rank's RNG states, as
    `load_checkpoint`) into `models`; FileNotFoundError where `directory` holds none."""
    path = latest_checkpoint(directory)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {directory}: train first (without --eval-only)")
    load_checkpoint(path, models)


@contextlib.contextmanager
def evaluation(model: nn.Module, *, seed: Optional[int] = None, device: Union[str, torch.device] = "cpu") -> Iterator[None]:
    """Evaluate `model` in the block: eval mode, and with `seed` a private RNG stream seeded by it
    (CPU and `device`'s CUDA RNG forked). The training mode and the global RNG states come back
    after, so that evaluating mid-training leaves the run as it would have been."""
    was_training = model.training
    device = torch.device(device)
    model.eval()
    try:
        if seed is None:
            yield
        else:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                yield
    finally:
        model.train(was_training)


def wrap_for_training(model: nn.Module, *, compile: bool) -> nn.Module:
    """`model` as the training step should call it: in DistributedDataParallel when several
    processes run (on this rank's GPU where there is one), then `torch.compile`d with `compile`.
    Hand the unwrapped `model` to the optimizer and to checkpoints."""
    if _world_size() > 1:
        device = next(model.parameters()).device
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return maybe_compile(model, compile)


def finish_run(run: Run, metrics: dict, *, out: PathLike, title: str, wrote: str = "", train_seconds: Optional[float] = None) -> dict:
    """The end of every recipe: `metrics` written to `out`/metrics.{md,json} and printed as a
    table, the run's times, then every rank waits for the others and leaves the process group.
    `wrote` names further files written (e.g. "predictions.png"). Returns `metrics`."""
    table = write_metrics(metrics, Path(out) / "metrics", title=title)
    print0("\n" + table)
    times = (f"train {train_seconds:.0f} s, " if train_seconds is not None else "") + f"total {time.perf_counter() - run.started:.0f} s"
    print0(f"{times} on {run.world} process(es); wrote {out}/metrics.md, .json" + (f", {wrote}" if wrote else ""))
    barrier()
    cleanup_distributed()
    return metrics
