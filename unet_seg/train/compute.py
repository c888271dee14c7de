"""How the model runs in a recipe: bf16 autocast, torch.compile with an on-disk cache, DDP,
and evaluation mode with a private RNG stream."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

import torch
from torch import nn

from .distributed import _world_size


F = TypeVar("F", bound=Callable)


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
    """`model` as the training step should call it: in DistributedDataParallel (`ddp`) when
    several processes run, then `torch.compile`d with `compile`. Hand the unwrapped `model` to the
    optimizer and to checkpoints."""
    if _world_size() > 1:
        model = ddp(model)
    return maybe_compile(model, compile)


def ddp(model: nn.Module, **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """`model` in DistributedDataParallel on this rank's GPU (or the CPU), built on a side stream
    on CUDA so that `CudaGraphStep` can capture its all-reduces. `ddp_kwargs` go to DDP."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index], **ddp_kwargs)
    torch.cuda.current_stream(device).wait_stream(side)
    return wrapped
