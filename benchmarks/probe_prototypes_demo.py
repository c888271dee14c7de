"""Why the prototype recipe's demo shows a small support gap: what its task asks, what the frozen
demo SD's features carry, and where a trained model's foreground goes. CPU, one thread.

    OMP_NUM_THREADS=1 python benchmarks/probe_prototypes_demo.py [--run RUN] [--out results/x.md]

1. The task, from ground truth (no model), on the recipe's 1-shot test and control episodes of fold
   0 (the control: the same queries and query masks, supports of the query's other class): the
   few-shot mIoU of predictors made from each query's own label map: the target object (what a
   model that reads its supports predicts on the 1-shot row), the other object (what it predicts on
   the control row), all objects (a model that finds objects and ignores the supports: the same on
   both rows), nothing.
2. The features, with the objects' true masks: each object's PANet prototype (masked average pool)
   of a feature map; "pair": a prototype of class A from another query is closer (cosine) to the
   query's class-A object than to its other object (chance 50%); "5-way": the nearest class
   centroid over the fold's 5 test classes, centroids from the other queries (chance 20%). Both
   raw and with the mean prototype subtracted ("centred"). Sources: the images, the block-codec
   latents (the U-Net's input), the recipe's frozen taps (up.1, up.2 at t = 50, 261) of the shipped
   pre-trained demo SD and of a random-weight one, and with --run the trained head's embedding;
   at 64² (the demo's size) and 128².
3. With --run (a `--demo` run's --out): the share of the target object's, the other object's and the
   background's pixels that the trained model predicts as foreground, on both rows.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import load_recipe  # noqa: E402
from unet_seg import demo  # noqa: E402
from unet_seg.data import synthetic  # noqa: E402
from unet_seg.data.fewshot import fewshot_episodes  # noqa: E402
from unet_seg.metrics import confusion_matrix, few_shot_scores  # noqa: E402
from unet_seg.prototypes import masked_average_pool  # noqa: E402
from unet_seg.segmentation import evaluate_episodes  # noqa: E402
from unet_seg.train import evaluation, latest_checkpoint, load_checkpoint  # noqa: E402

R = load_recipe("fewshot_prototypes_coco20i")


def query_labels(ds, index: int) -> tuple[torch.Tensor, int, int]:
    """The query's full label map (both objects' classes) -> (labels [H, W], target class, other class),
    drawn as `synthetic.FewShotEpisodes` draws it (checked against the dataset's query image)."""
    c = ds.classes[index % len(ds.classes)]
    g = synthetic._generator(ds.seed, index, 0)
    others = [k for k in ds.classes if k != c]
    picks = [others[i] for i in torch.randint(len(others), (ds.distractors,), generator=g).tolist()]
    objects = picks + [c]
    order = torch.randperm(len(objects), generator=synthetic._generator(ds.seed, index, 0, 1)).tolist()
    image, labels = synthetic.scene(g, [objects[i] for i in order], ds.size, ds.style, ds.ignore_border)
    assert torch.equal(image, ds[index]["query"]), "the mirror no longer draws what FewShotEpisodes draws"
    return labels, c, picks[0]


def task_table(ds, num_labels, test_labels) -> list[str]:
    preds = {"the target object (reads its supports, 1-shot row)": lambda lab, t, o: lab == t,
             "the other object (reads its supports, control row)": lambda lab, t, o: lab == o,
             "all objects (ignores the supports)": lambda lab, t, o: lab > 0,
             "nothing": lambda lab, t, o: torch.zeros_like(lab, dtype=torch.bool)}  # fmt: skip
    conf = {n: torch.zeros(num_labels, num_labels, dtype=torch.long) for n in preds}
    for i in range(len(ds)):
        lab, t, o = query_labels(ds, i)
        target = (lab == t).long() * t
        for n, f in preds.items():
            conf[n] += confusion_matrix((f(lab, t, o).long() * t)[None], target[None], num_labels)
    rows = ["| predictor (the query mask is always the target object) | mIoU | FB-IoU |", "|---|---|---|"]
    return rows + [f"| {n} | {s['mIoU']:.2f} | {s['FB-IoU']:.2f} |" for n, s in ((n, few_shot_scores(c, test_labels)) for n, c in conf.items())]


def object_prototypes(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """feats [N, C, h, w], labels [N, H, W] -> (prototypes [M, C], class [M], scene [M]) for every object
    that covers at least half a feature pixel."""
    protos, classes, scenes = [], [], []
    for i in range(len(labels)):
        for c in labels[i].unique().tolist():
            if c == 0:
                continue
            mask = (labels[i] == c).float()
            if mask.mean() * feats.shape[-1] * feats.shape[-2] < 0.5:
                continue
            protos.append(masked_average_pool(feats[i].float(), mask))
            classes.append(c), scenes.append(i)
    return torch.stack(protos), torch.tensor(classes), torch.tensor(scenes)


def separability(protos, classes, scenes, test_classes) -> tuple[float, float]:
    """(pair accuracy, 5-way nearest-centroid accuracy) in %, cosine."""
    p = torch.nn.functional.normalize(protos.double(), dim=1)
    cos = p @ p.T
    wins, total = 0.0, 0
    for i in scenes.unique().tolist():
        objs = (scenes == i).nonzero().flatten().tolist()
        if len(objs) != 2:
            continue
        for t, o in (objs, objs[::-1]):
            support = (classes == classes[t]) & (scenes != i)
            wins += (cos[support, t] > cos[support, o]).double().mean().item()
            total += 1
    right = 0
    for k in range(len(p)):
        others = scenes != scenes[k]
        centroids = torch.stack([p[others & (classes == c)].mean(0) for c in test_classes])
        right += int(test_classes[int((torch.nn.functional.normalize(centroids, dim=1) @ p[k]).argmax())] == classes[k])
    return 100 * wins / max(total, 1), 100 * right / len(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a `--demo` run's --out (its latest checkpoint's head)")
    ap.add_argument("--eval-items", type=int, default=200, help="test episodes (the recipes' --eval-items)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "prototypes_demo_probe.md"))
    args = ap.parse_args()
    lines = [f"# Prototype recipe's demo: task and features (fold 0, {args.eval_items} test episodes, seed 0)", "",
             f"`python benchmarks/probe_prototypes_demo.py{' --run RUN' if args.run else ''}`, torch {torch.__version__}, CPU, "
             f"{torch.get_num_threads()} thread(s), fp32.", ""]  # fmt: skip
    task = fewshot_episodes(0, size=64, test_episodes=args.eval_items, seed=0)
    test_classes = list(task.test_labels)
    lines += ["## 1. The task, from ground truth", "", *task_table(task.test[1], task.num_labels, test_classes), ""]
    print("\n".join(lines), flush=True)

    torch.manual_seed(0)
    sds = {"shipped pre-trained demo SD": demo.demo_sd(False), "random-weight demo SD": demo.demo_sd(True)}
    head = None
    if args.run:
        channels = len(R.TIMESTEPS) * sum(sds["shipped pre-trained demo SD"].unet.feature_info(n).channels for n in R.TAPS)
        head = R.embedding_head(channels, R.DEMO["dim"])
        load_checkpoint(latest_checkpoint(args.run), {"head": head})
        head.eval()
    rows = ["| size | features | C × h × w | objects | pair % | pair % (centred) | 5-way % | 5-way % (centred) |", "|---|---|---|---|---|---|---|---|"]
    for size in (64, 128):
        ds = fewshot_episodes(0, size=size, test_episodes=args.eval_items, seed=0).test[1]
        images = torch.stack([ds[i]["query"] for i in range(len(ds))])
        labels = torch.stack([query_labels(ds, i)[0] for i in range(len(ds))])
        with torch.no_grad():
            sources = {"image pixels": images, "block-codec latents": next(iter(sds.values())).vae.encode(images)}
            for name, sd in sds.items():
                sd.unet.eval()
                torch.manual_seed(0)
                sources[f"taps, {name}"] = R.frozen_features(sd, sd.encode_prompt([""]), images)
            if head is not None and size == 64:
                sources["trained head's embedding (pre-trained SD)"] = head(sources["taps, shipped pre-trained demo SD"])
        for name, feats in sources.items():
            protos, classes, scenes = object_prototypes(feats, labels)
            raw = separability(protos, classes, scenes, test_classes)
            centred = separability(protos - protos.mean(0), classes, scenes, test_classes)
            shape = "×".join(map(str, feats.shape[1:]))
            rows.append(f"| {size}² | {name} | {shape} | {len(protos)} | {raw[0]:.1f} | {centred[0]:.1f} | {raw[1]:.1f} | {centred[1]:.1f} |")
            print(rows[-1], flush=True)
    lines += ["## 2. Class identity in object prototypes (true masks; chance: pair 50%, 5-way 20%)", "", *rows, ""]

    if head is not None:
        sd = sds["shipped pre-trained demo SD"]
        context = sd.encode_prompt([""])
        rows = ["| row | target object → fg % | other object → fg % | background → fg % | mIoU (the recipe's, reproduced) |", "|---|---|---|---|---|"]
        for row, ds in (("1-shot", task.test[1]), ("control", task.control)):
            preds = []
            predict = lambda *episode: preds.append(R.episode_logits(head, sd, context, *episode).argmax(1)) or preds[-1]  # noqa: E731
            with evaluation(head, seed=0):  # as the recipe evaluates: the same RNG stream, the same predictions
                conf, _ = evaluate_episodes(predict, ds, task.num_labels, torch.device("cpu"))
            pred = torch.cat(preds)
            counts = torch.zeros(3, 2)  # (target, other, background) × (pixels, predicted fg)
            for i in range(len(ds)):
                lab, t, o = query_labels(task.test[1], i)  # the control's queries are the 1-shot row's
                for j, region in enumerate((lab == t, lab == o, lab == 0)):
                    counts[j] += torch.tensor([region.sum().item(), (pred[i].bool() & region).sum().item()])
            share = 100 * counts[:, 1] / counts[:, 0]
            rows.append(f"| {row} | {share[0]:.1f} | {share[1]:.1f} | {share[2]:.1f} | {few_shot_scores(conf, test_classes)['mIoU']:.2f} |")
            print(rows[-1], flush=True)
        lines += ["## 3. Where the trained model's foreground goes", "", *rows, ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
