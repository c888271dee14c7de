"""Training checkpoints: safetensors only, written atomically by rank 0, resumed exactly.

A checkpoint holds what training changes: each model's trainable parameters and buffers; its
frozen parameters (`frozen_weights`) only as a fingerprint that resuming checks against the ones
the run rebuilt. Tensors are stored as tensors; everything else (optimizer hyper-parameters,
scheduler state, counters, every rank's RNG states) as JSON in the header. Resuming is exact
(bit for bit on the same hardware and world size) when the data order comes from
`loop.resumable_loader` and the loss draws randomness only from the global RNGs restored here.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..files import atomic_path
from ..hub import CheckpointError, check_state_dict, weights_fingerprint
from .distributed import _rank, _world_size, all_gather_str, barrier, is_main, print0, unwrap
from .loop import _INTERRUPT
from .rng import reseed_from, rng_states, set_rng_states
from .report import PathLike


CHECKPOINT_FORMAT = "unet_seg.checkpoint/1"
CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.safetensors$")


class FrozenWeightsDiffer(CheckpointError):
    """A checkpoint trained on other frozen weights than the model it is loaded into: another base
    checkpoint (`--model`), or the same one in another dtype. Every checkpoint of the run differs
    alike, so `resume_latest` refuses at once rather than passing over them."""


class Resumed(NamedTuple):
    step: int
    epoch: int
    extra: dict
    final: bool = False  # a run's last checkpoint, written without optimizer and scheduler state


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


def frozen_weights(model: nn.Module) -> dict[str, Tensor]:
    """The entries of `model`'s state dict that a checkpoint fingerprints rather than stores: its
    frozen parameters (requires_grad False), the ones rebuilt from the run's base checkpoint. A
    model with no trainable parameter at all is stored whole (passed to be kept: e.g. a demo's
    U-Net pre-trained in the run, which nothing could rebuild); buffers are always stored."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if not any(p.requires_grad for p in params.values()):
        return {}
    return {k: v for k, v in model.state_dict().items() if k in params and not params[k].requires_grad}


def _frozen_header(frozen: dict[str, Tensor]) -> dict:
    return {"sha256": weights_fingerprint(frozen), "tensors": {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in frozen.items()}}


def _check_frozen(path: PathLike, name: str, stored: dict, own: dict[str, Tensor]) -> None:
    """FrozenWeightsDiffer, in one line naming what differs, unless the model's state dict `own`
    holds, under the names `stored` (`_frozen_header`) fingerprinted, the same tensors."""
    names = stored["tensors"]
    absent = sorted(set(names) - set(own))
    if absent:
        raise CheckpointError(f"{path} (model {name!r}): frozen tensors this model does not have: {absent[:5]}")
    here = _frozen_header({k: own[k] for k in names})
    if here["sha256"] == stored["sha256"]:
        return
    differs = (_differing("dtypes", names, here["tensors"], 0) or _differing("shapes", names, here["tensors"], 1)
               or f"the same {len(names)} names, dtypes and shapes with other values: another checkpoint of the same model")
    raise FrozenWeightsDiffer(
        f"{path}: model {name!r} was trained on other frozen weights than this run built ({differs}; sha256 {stored['sha256'][:12]} there, "
        f"{here['sha256'][:12]} here): resume with the base weights the run started from (the same --model and weight options)"
    )


def _differing(what: str, there: dict, here: dict, field: int) -> str:
    """"other <what>: name (a there, b here), ..." for the tensors whose `field` of `_frozen_header`'s
    [dtype, shape] differs (three named, the rest counted); "" when none does."""
    items = [f"{k} ({there[k][field]} there, {here[k][field]} here)" for k in there if there[k][field] != here[k][field]]
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return f"other {what}: {', '.join(items[:3])}{more}" if items else ""


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
    final: bool = False,
) -> Path:
    """Write `checkpoint_path(directory, step)` atomically (rank 0) and return its path.

    Call it on every rank: each rank's RNG states are gathered so that all of them resume
    exactly; the ranks wait for the file before returning. Stored: each model's state dict
    (unwrapped from DDP/compile, under `model/<name>/`), the optimizer and scheduler state dicts,
    `step`, `epoch`, `extra` (JSON-able values and tensors, e.g. the run's arguments or the best
    metric so far) and the RNG states. Pass only the modules that training changes. Of each model
    its frozen parameters (`frozen_weights`) are not stored: their names, dtypes, shapes and sha256
    (`hub.weights_fingerprint`) are, and `load_checkpoint` checks them. With
    `keep_last=N`, older `step_*.safetensors` files in `directory` beyond the newest N are deleted.

    `final=True` (a demo's last step: the run will not go on): the weights without the optimizer
    and scheduler state, with AdamW a third of the size; once it is in place, the earlier
    `step_*.safetensors` files in `directory` are deleted (a finished demo keeps one checkpoint).
    It re-evaluates and exports as any other; resumed to more steps (`load_checkpoint`), training
    goes on from its weights with a fresh optimizer and scheduler, and `resume_latest` says so.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    rng = [json.loads(s) for s in all_gather_str(json.dumps(rng_states()))]
    path = checkpoint_path(directory, step)
    if is_main():
        tensors: dict[str, Tensor] = {}
        frozen: dict[str, dict] = {}
        for name, model in models.items():
            model = unwrap(model)
            skipped = frozen_weights(model)
            if skipped:
                frozen[name] = _frozen_header(skipped)
            for key, value in model.state_dict().items():
                if key not in skipped:
                    tensors[f"model/{name}/{key}"] = value.detach().cpu().contiguous()
        header = {
            "step": step,
            "epoch": epoch,
            "models": list(models),
            "frozen": frozen,
            "optimizer": _pack(optimizer.state_dict(), "optimizer", tensors) if optimizer is not None and not final else None,
            "scheduler": _pack(scheduler.state_dict(), "scheduler", tensors) if scheduler is not None and not final else None,
            "final": final,
            "extra": _pack(extra or {}, "extra", tensors),
            "rng": rng,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "state": json.dumps(header)})
        found = _checkpoints(directory)
        if final:  # the run will not go on: its earlier checkpoints (and their optimizer state) are not needed
            stale = found[: found.index(path)]
        else:
            stale = found[:-keep_last] if keep_last is not None else []
        for old in stale:
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
    scheduler (when given), and this rank's RNG states; return (step, epoch, extra, final). A
    `final` checkpoint (`save_checkpoint`) has no optimizer or scheduler state: they are left as
    they are. A model's frozen parameters, which the file holds as a fingerprint only, must be
    the ones the model already has: else FrozenWeightsDiffer names what differs.

    Every rank reads the file. A missing, truncated or corrupt file, a missing model, optimizer
    or scheduler state, and a state dict that does not fit (keys listed) raise CheckpointError
    naming the file. Resumed with another number of processes, the saved streams cannot be handed
    out one per rank: each rank gets a fresh one (`rng.reseed_from`: none repeats noise already
    drawn) and rank 0 warns that the run continues, but not bit for bit.
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
    states, frozen = {}, header.get("frozen", {})  # checkpoints before frozen fingerprints: none
    for name, model in models.items():  # every model checked before any is loaded
        prefix, own, fingerprinted = f"model/{name}/", unwrap(model).state_dict(), frozen.get(name, {}).get("tensors", {})
        states[name] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        check_state_dict({k: v for k, v in own.items() if k not in fingerprinted}, states[name], f"{path} (model {name!r})")
        if name in frozen:
            _check_frozen(path, name, frozen[name], own)
    for name, model in models.items():
        unwrap(model).load_state_dict(states[name], strict=name not in frozen)
    for what, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if header[what] is None:
            if header.get("final"):
                continue
            raise CheckpointError(f"{path}: holds no {what} state")
        lrs = [group["lr"] for group in obj.param_groups] if what == "optimizer" else []
        try:
            obj.load_state_dict(_unpack(header[what], tensors))
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: the {what} state does not fit ({e})") from e
        for i, lr in enumerate(lrs):
            if isinstance(lr, Tensor):  # a tensor lr keeps its device and identity (a CUDA graph reads it there)
                obj.param_groups[i]["lr"] = lr.copy_(obj.param_groups[i]["lr"])
    if restore_rng:
        if len(header["rng"]) == _world_size():
            set_rng_states(header["rng"][_rank()])
        else:
            reseed_from(header["rng"], _rank())
            if is_main():
                warnings.warn(
                    f"{path} was written by {len(header['rng'])} process(es), this run has {_world_size()}: each rank's "
                    "random stream restarts from a hash of the saved streams and its rank (none of them repeats the "
                    "noise already drawn), so the resumed run continues, but not bit for bit as an uninterrupted one"
                )
    return Resumed(header["step"], header["epoch"], _unpack(header["extra"], tensors), bool(header.get("final")))


def resume_latest(
    directory: PathLike,
    models: dict[str, nn.Module],
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    steps: Optional[int] = None,
) -> int:
    """--resume: the steps done by the latest usable checkpoint in `directory`, restored into
    `models`, the optimizer and the scheduler (`load_checkpoint`). Where there is none it says
    so ("starting from step 0") and returns 0. A checkpoint that cannot be used (corrupt,
    truncated, not fitting) is passed over for the one before it with a warning naming it; when
    none can be used, CheckpointError names them all and says what to delete.

    `steps`: this run's --steps. Where the checkpoint's run trained to another number (its
    `extra["steps"]`, or the `'steps'` of the `extra["args"]` the recipes store) one line says
    so: the run continues to `steps`, as asked, but matches no uninterrupted run of either length
    (a scheduler restored with a `total_iters` of the run's length keeps it, and the line says so)."""
    found = _checkpoints(directory)[::-1]
    if not found:
        print0(f"--resume: no checkpoint in {directory}; starting from step 0")
        return 0
    bad = []
    for path in found:
        try:
            step, _, extra, final = load_checkpoint(path, models, optimizer=optimizer, scheduler=scheduler)
        except FrozenWeightsDiffer:
            raise
        except CheckpointError as e:
            bad.append(path)
            if is_main():
                warnings.warn(f"--resume: passing over {path}, which cannot be used: {e}", stacklevel=2)
            continue
        print0(f"resumed {path} (step {step})" + (f"; passed over {len(bad)} newer unusable checkpoint(s)" if bad else ""))
        if final and steps is not None and step < steps and (optimizer is not None or scheduler is not None):
            print0(f"--resume: {path.name} ended a finished demo and holds its weights alone: training goes on from them with a "
                   "fresh optimizer and learning-rate schedule, not as one uninterrupted run would")  # fmt: skip
        run_steps = _run_steps(extra)
        if steps is not None and run_steps is not None and run_steps != steps:
            schedule = getattr(scheduler, "total_iters", None)  # LinearLR, PolynomialLR, ... restored with the run's length
            print0(
                f"--resume: resuming at step {step} of the run's {run_steps}; "
                + (f"training to {steps} as asked (--steps)" if step < steps else f"--steps {steps} is already reached: nothing to train")
                + (f"; the learning-rate schedule still ends at step {schedule}" if step < steps and schedule == run_steps else "")
            )
        return step
    raise CheckpointError(
        f"--resume: none of the {len(bad)} checkpoint(s) in {directory} can be used (warnings above say why): "
        f"delete {', '.join(p.name for p in bad)} to start from step 0, or give another --out"
    )


def _run_steps(extra: dict) -> Optional[int]:
    """The --steps a checkpoint's run was started with, where its `extra` records it."""
    if isinstance(extra.get("steps"), int):
        return extra["steps"]
    found = re.search(r"'steps': (\d+)\b", extra.get("args", "")) if isinstance(extra.get("args"), str) else None
    return int(found.group(1)) if found else None


def load_latest(directory: PathLike, models: dict[str, nn.Module]) -> None:
    """Evaluation only: the latest checkpoint's weights (and this rank's RNG states, as
    `load_checkpoint`) into `models`; FileNotFoundError where `directory` holds none."""
    path = latest_checkpoint(directory)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {directory}: train first (without --eval-only)")
    load_checkpoint(path, models)
