"""Diagnosis of the prototype recipe's demo (recipes/fewshot_prototypes_coco20i.py): its trained
head, from a run's latest checkpoint, scored three ways on the same 200 test episodes of fold 0:
with the episodes' supports, with the control's (the query's other class), and with the query's
own image and mask as its support (an oracle: an upper bound for prototypes of these features).

    python recipes/fewshot_prototypes_coco20i.py --demo --out runs/prototypes_demo
    python benchmarks/diagnose_prototypes_demo.py runs/prototypes_demo
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import load_recipe  # noqa: E402
from unet_seg import demo  # noqa: E402
from unet_seg.data.fewshot import fewshot_episodes  # noqa: E402
from unet_seg.metrics import few_shot_scores  # noqa: E402
from unet_seg.segmentation import evaluate_episodes  # noqa: E402
from unet_seg.train import latest_checkpoint, load_checkpoint  # noqa: E402


def main(run: str) -> None:
    r = load_recipe("fewshot_prototypes_coco20i")
    args = r.parse_args(["--demo"])
    torch.manual_seed(args.seed)
    sd = demo.tiny_sd()
    channels = len(r.TIMESTEPS) * sum(sd.unet.feature_info(n).channels for n in r.TAPS)
    head = r.embedding_head(channels, args.dim)
    load_checkpoint(latest_checkpoint(run), {"head": head, "unet": sd.unet})
    sd.unet.eval(), head.eval()
    context = sd.encode_prompt([""])
    task = fewshot_episodes(0, size=args.size, test_episodes=args.eval_items, seed=args.seed)
    oracle = [{**ep, "supports": ep["query"][None], "support_masks": ep["query_mask"][None]} for ep in task.test[1]]
    predict = lambda *episode: r.episode_logits(head, sd, context, *episode).argmax(1)  # noqa: E731
    for name, data in (("1-shot", task.test[1]), ("control", task.control), ("oracle: the query's own mask as its support", oracle)):
        torch.manual_seed(args.seed)  # the recipe evaluates with this seed (train.evaluation)
        with torch.no_grad():
            conf, _ = evaluate_episodes(predict, data, task.num_labels, torch.device("cpu"))
        print(f"| {name} | {few_shot_scores(conf, task.test_labels)} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
