"""Launcher for the multi-process recipe tests (not a test module): runs a recipe's `main` under
torchrun with two additions. At every `unet_seg.train.save_checkpoint`, each rank also writes the
parameters of the models it checkpoints to `<probe>/rank<r>_<run folder>_step<s>.safetensors` (only
rank 0 writes the real checkpoint, so a rank that drifted from the others would go unseen), and
rank 0 copies the checkpoint to `<probe>/checkpoints/<run folder>/` as it is written (a finished
demo deletes its earlier checkpoints; the resume tests start from one). Every
`unet_seg.train.rank_share` (the evaluation's split of a dataset) appends the dataset's length and
this rank's item indices to `<probe>/shares_rank<r>.jsonl`. Every `unet_seg.train.wrap_for_training`
(the model as built, before DDP broadcasts rank 0's weights) writes its state dict to
`<probe>/init<k>_rank<r>.safetensors` (k = 0, 1, ... per call). Every draw from the global RNGs of
torch (`torch.randn`, `rand`, `randint`, `randperm`, their `_like` forms, `normal`, `multinomial`
called without a `generator`) inside a training step (between two batches of
`unet_seg.train.training_batches`) is appended to `<probe>/draws_rank<r>.jsonl`: run (0 for the
first `training_batches` loop, 1 for the next, ...), step, function, shape, dtype, a hash of the values and the first 8 of them.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_probe.py <recipe> <probe dir> <recipe args...>
"""

import functools
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import unet_seg.train as train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import load_recipe  # noqa: E402


def main(recipe: str, probe: Path, args: list[str]) -> None:
    real_save = train.save_checkpoint

    def save_checkpoint(directory, step, models, *a, **kw):
        path = real_save(directory, step, models, *a, **kw)
        if Path(directory).name == "sanity-check":  # `train.sanity_check`'s, read back at once: not a training step
            return path
        rank = _rank()
        if rank == 0:
            kept = probe / "checkpoints" / Path(directory).name
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, kept)
        params = {
            f"{name}/{key}": p.detach().cpu().contiguous()
            for name, model in models.items()
            for key, p in train.unwrap(model).named_parameters()
        }
        save_file(params, str(probe / f"rank{rank}_{Path(directory).name}_step{step}.safetensors"))
        return path

    real_share = train.rank_share

    def rank_share(data):
        share = real_share(data)
        rank = _rank()
        with open(probe / f"shares_rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"len": len(data), "indices": list(share.indices)}) + "\n")
        return share

    real_wrap = train.wrap_for_training
    wrapped = []

    def wrap_for_training(model, **kw):
        state = {k: v.detach().cpu().clone() for k, v in train.unwrap(model).state_dict().items()}
        save_file(state, str(probe / f"init{len(wrapped)}_rank{_rank()}.safetensors"))
        wrapped.append(model)
        return real_wrap(model, **kw)

    draws, current, runs = [], [None], [0]  # this step's global draws; the step under way (None: not training); loops run

    def recorded(name, fn):
        @functools.wraps(fn)
        def draw(*a, **kw):
            out = fn(*a, **kw)
            if current[0] is not None and kw.get("generator") is None:
                data = out.detach().cpu().contiguous()
                digest = hashlib.sha256(data.view(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()[:16]
                draws.append({"run": runs[0] - 1, "step": current[0], "fn": name, "shape": list(data.shape), "dtype": str(data.dtype),
                              "float": data.is_floating_point(), "sha": digest, "head": data.flatten()[:8].tolist()})  # fmt: skip
            return out

        return draw

    for name in ("randn", "rand", "randint", "randperm", "randn_like", "rand_like", "randint_like", "normal", "multinomial"):
        setattr(torch, name, recorded(name, getattr(torch, name)))

    real_batches = train.training_batches

    def training_batches(loader, step, steps):
        runs[0] += 1
        try:
            for item in real_batches(loader, step, steps):
                current[0] = item[0]
                yield item
                flush()
        finally:
            flush()

    def flush():
        current[0] = None
        with open(probe / f"draws_rank{_rank()}.jsonl", "a") as f:
            f.writelines(json.dumps(d) + "\n" for d in draws)
        draws.clear()

    # before the recipe and unet_seg.segmentation import them by name
    train.save_checkpoint, train.rank_share = save_checkpoint, rank_share
    train.wrap_for_training, train.training_batches = wrap_for_training, training_batches
    assert "unet_seg.segmentation" not in sys.modules, "import the recipe only after patching"
    probe.mkdir(parents=True, exist_ok=True)
    load_recipe(recipe).main(args)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
