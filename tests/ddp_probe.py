"""Launcher for the multi-process recipe tests (not a test module): runs a recipe's `main` under
torchrun with two additions. At every `unet_seg.train.save_checkpoint`, each rank also writes the
parameters of the models it checkpoints to `<probe>/rank<r>_<run folder>_step<s>.safetensors` (only
rank 0 writes the real checkpoint, so a rank that drifted from the others would go unseen). Every
`unet_seg.train.rank_share` (the evaluation's split of a dataset) appends the dataset's length and
this rank's item indices to `<probe>/shares_rank<r>.jsonl`.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_probe.py <recipe> <probe dir> <recipe args...>
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

import unet_seg.train as train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import load_recipe  # noqa: E402


def main(recipe: str, probe: Path, args: list[str]) -> None:
    real_save = train.save_checkpoint

    def save_checkpoint(directory, step, models, *a, **kw):
        path = real_save(directory, step, models, *a, **kw)
        rank = dist.get_rank() if dist.is_initialized() else 0
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
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(probe / f"shares_rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"len": len(data), "indices": list(share.indices)}) + "\n")
        return share

    # before the recipe and unet_seg.segmentation import them by name
    train.save_checkpoint, train.rank_share = save_checkpoint, rank_share
    assert "unet_seg.segmentation" not in sys.modules, "import the recipe only after patching"
    probe.mkdir(parents=True, exist_ok=True)
    load_recipe(recipe).main(args)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
