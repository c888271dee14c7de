"""Processes: joining a torchrun group, who is rank 0, sharing work and values between ranks.

Every function here works the same in a plain one-process run (rank 0 of 1, no process group).
Collectives (`barrier`, `all_gather_str`, `check_finite_everywhere`) must be called by every rank.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any, NoReturn, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ..losses import check_finite


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
            global _joined_gloo
            _joined_gloo = True
    return rank, world_size, local_rank, device


_joined_gloo = False  # see exit_gloo_process


def joined_gloo() -> bool:
    """Whether `init_distributed` joined a gloo process group in this process."""
    return _joined_gloo


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


def exit_gloo_process(status: Union[int, str, None] = 0) -> NoReturn:
    """End a process that joined a gloo group: leave the group, flush stdout and stderr, exit with
    `status` (as `sys.exit` takes it: a string is printed to stderr, status 1) and skip the
    interpreter's teardown. `unet_seg.cli.run` ends the recipes' gloo processes so.

    Why: DDP keeps a gloo process group alive past `destroy_process_group` (torch 2.13: its two
    worker threads are never joined), and a worker thread drops each all-reduce only after marking
    it done. The all-reduces DDP starts inside `backward()` hold Python objects (the `contextvars`
    context that `torch.autograd` keeps in thread-local state for a backward, tensors with a Python
    side). When a process ends right after a backward (a loop's last step, an error raised after
    it) on a busy machine, that drop can come while the interpreter is finalizing: taking the GIL
    then ends the worker thread inside a C++ destructor, and the process aborts ("terminate called
    without an active exception", SIGABRT) instead of exiting with its status."""
    cleanup_distributed()
    gc.collect()  # DataLoader iterators in reference cycles shut their workers down now
    if isinstance(status, str):
        print(status, file=sys.stderr)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)


def print0(*args: Any, **kwargs: Any) -> None:
    """`print` on rank 0 only (flushed, so logs of several processes interleave sensibly)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def print_demo(args: Any, what: str) -> None:
    """For a demo run (`args.demo`), on rank 0: why it is a demo, unless --demo asked for it
    (`args.demo_reason`, set by `unet_seg.cli.parse_recipe_args`), then `"DEMO: <what>"`."""
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


def all_gather_str(s: str) -> list[str]:
    """Every rank's `s`, in rank order (a collective: all ranks call it). Strings travel as
    padded uint8 tensors, so nothing is pickled."""
    world_size = _world_size()
    if world_size == 1:
        return [s]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    encoded = s.encode()
    data = (torch.frombuffer(bytearray(encoded), dtype=torch.uint8) if encoded else torch.empty(0, dtype=torch.uint8)).to(device)
    length = torch.tensor([data.numel()], device=device)
    lengths = [torch.empty_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    lengths_int = [int(n) for n in lengths]
    padded = torch.zeros(max(lengths_int), dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return [t[:n].cpu().numpy().tobytes().decode() for t, n in zip(gathered, lengths_int)]


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
