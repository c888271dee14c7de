"""The optimiser step without host syncs, and a whole training step replayed as one CUDA graph.

    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-4, device="cuda"), fused=True, capturable=True)
    def train_step(x, y):                       # fixed shapes, no host syncs
        loss = loss_fn(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_step(opt, params, loss, max_norm=1.0)   # skipped on the device if not finite
        return loss
    step = CudaGraphStep(train_step, [model], opt)       # captured at the first call per shape
    loss = check_finite_everywhere(step(x, y), "loss")  # raises with the weights untouched
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn


def backward_and_step(opt: torch.optim.Optimizer, params: Iterable[Tensor], loss: Tensor, max_norm: Optional[float]) -> Tensor:
    """The four lines of every training step: zero the gradients, backpropagate `loss`, then
    `clip_and_step` (skipped on the device if not finite; no host sync) -> `loss`, to read with
    `check_finite_everywhere` after the step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip_and_step(opt, params, loss, max_norm)
    return loss


def clip_and_step(opt: torch.optim.Optimizer, params: Iterable[Tensor], loss: Tensor, max_norm: Optional[float]) -> Optional[Tensor]:
    """Clip the gradients' global L2 norm to `max_norm` (None: no clipping) and step `opt`,
    skipped on the device (weights and optimiser state unchanged) where the loss, or the gradient
    norm when clipping, is not finite.

    No host sync, so a compiled or CUDA-graphed step can hold it; read the loss afterwards
    (`check_finite_everywhere`) to stop the run. The skip is the `found_inf` flag that GradScaler
    hands to fused optimisers: `opt` must be fused (torch's Adam, AdamW, SGD with `fused=True`).
    Returns the gradient norm before clipping ([] tensor), None without clipping."""
    if not all(group.get("fused") for group in opt.param_groups):
        raise ValueError(f"clip_and_step skips non-finite steps through fused optimisers: build {type(opt).__name__} with fused=True")
    finite = torch.isfinite(loss).all()
    norm = None
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = finite & torch.isfinite(norm)
    opt.found_inf = (~finite).float()
    try:
        opt.step()
    finally:
        del opt.found_inf
    return norm


def use_cuda_graph(flag: Optional[bool], device: torch.device, script: str, default: bool = True) -> bool:
    """A recipe's `--cuda-graph / --no-cuda-graph` against its device: not given (None) -> `default`
    where the run has a GPU, off elsewhere; asked for without a GPU -> a usage error naming `script`."""
    if flag and device.type != "cuda":
        raise SystemExit(f"{script}: error: --cuda-graph needs a CUDA device, this run has {device}")
    return device.type == "cuda" and default if flag is None else flag


class CudaGraphCall:
    """An inference function `fn(*inputs) -> outputs` (no grad, fixed shapes, no host syncs)
    captured as one CUDA graph at its first call for each set of input shapes, then replayed.
    Its random draws come from the default CUDA generator at the offset it has at each call: seed
    it before a call (`torch.manual_seed` under `fork_rng`) and the replay draws what an eager call
    would. Calls copy the inputs in and return the captured outputs, valid until the next call.
    Graphs of several shapes share one memory pool; `close()` frees them."""

    def __init__(self, fn: Callable[..., Any], warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{type(self).__name__} needs a CUDA device")
        self.fn, self.warmup, self.pool = fn, warmup, None
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Any]] = {}

    def __call__(self, *inputs: Tensor) -> Any:
        key = tuple((x.shape, x.dtype, x.device) for x in inputs)
        if key not in self.graphs:
            self.graphs[key] = capture(self.fn, inputs, self.pool, self.warmup, self._undo_warmup())
            self.pool = self.graphs[key][0].pool()
        graph, static_inputs, outputs = self.graphs[key]
        for static, x in zip(static_inputs, inputs):
            static.copy_(x, non_blocking=True)
        graph.replay()
        return outputs

    def close(self) -> None:
        """Free the graphs and their memory; a later call captures again. Call it before
        `cleanup_distributed`: a live graph holding NCCL calls makes destroy_process_group hang
        (pytorch/pytorch#115388)."""
        for graph, _, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.pool = None

    def _undo_warmup(self) -> Optional[Callable[[], None]]:
        return None


class CudaGraphStep(CudaGraphCall):
    """A training step `step(*inputs) -> outputs` (forward, backward, optimiser: a whole step)
    captured as one CUDA graph at its first call for each set of input shapes, then replayed:
    one launch per step instead of thousands, so the GPU no longer waits for the host.

    `step` must hold its shapes fixed, make no host syncs (`clip_and_step`, not `check_finite`),
    and step an Adam or AdamW built with `fused=True, capturable=True` and a tensor `lr` on the
    GPU (a float lr would be frozen into the graph; schedulers update the tensor in place). The
    warm-up calls that precede each capture run on a forked RNG and are undone (weights,
    buffers, optimiser state: a copy of them is held meanwhile), so a run with graphs trains as
    one without would (same random streams, numbers equal to float rounding; tests/test_step.py,
    on a GPU), and a resumed run captures the same way. Calls copy the inputs into the
    captured ones and return the captured outputs, valid until the next call. Graphs of several
    shapes share one memory pool: only the weights and optimiser state outlive a replay.
    DistributedDataParallel works when it was built on a side stream (`ddp`, `wrap_for_training`)
    and warms up for 11 steps (done here); `close()` before leaving the process group."""

    def __init__(self, step: Callable[..., Any], modules: Sequence[nn.Module], optimizer: torch.optim.Optimizer, warmup: int = 3):
        super().__init__(step, warmup)
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"CudaGraphStep undoes its warm-up steps for Adam and AdamW only, got {type(optimizer).__name__}")
        for group in optimizer.param_groups:
            lr = group["lr"]
            if not (group["capturable"] and group["fused"] and isinstance(lr, Tensor) and lr.is_cuda):
                raise ValueError(
                    "CudaGraphStep needs fused=True, capturable=True and lr a CUDA tensor in every parameter group, "
                    f"got fused={group['fused']}, capturable={group['capturable']}, lr={lr!r}"
                )
        ddp = any(isinstance(getattr(m, "_orig_mod", m), nn.parallel.DistributedDataParallel) for m in modules)
        self.modules, self.optimizer = list(modules), optimizer
        self.warmup = max(warmup, 11) if ddp else warmup

    def _state(self) -> list[Tensor]:
        tensors = [t for m in self.modules for t in (*m.parameters(), *m.buffers())]
        return tensors + [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]

    def _undo_warmup(self) -> Callable[[], None]:
        """A copy of the state now, before the warm-up steps -> the function that puts it back
        after them (state they created starts from zero, as Adam's does)."""
        saved = {id(t): t.detach().clone() for t in self._state()}

        def undo():
            with torch.no_grad():
                for t in self._state():
                    if id(t) in saved:
                        t.copy_(saved[id(t)])
                    else:
                        t.zero_()

        return undo


def capture(fn: Callable[..., Any], inputs: Sequence[Tensor], pool, warmup: int, after_warmup: Optional[Callable[[], None]] = None):
    """`fn` warmed up `warmup` times on a side stream and a forked RNG (kernels picked, lazy state
    made), `after_warmup()` run, then captured into a CUDA graph on copies of `inputs` -> (graph,
    the static inputs, the captured outputs). The RNG is left as before: the replays draw."""
    device = inputs[0].device
    static_inputs = [x.detach().clone() for x in inputs]
    with torch.random.fork_rng(devices=[device]):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*static_inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        if after_warmup is not None:
            after_warmup()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread allocating pinned memory meanwhile is legal
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = fn(*static_inputs)
    return graph, static_inputs, outputs
