"""Few-shot segmentation by prototypes of frozen diffusion features, on COCO-20i (or `--demo`).

A method of our own, composed from the library: Stable Diffusion stays frozen; its U-Net features,
tapped at K timesteps in one call, go through a small trainable embedding head, and the query is
scored against prototypes pooled from the supports (PANet's masked average pooling, Wang et al.,
ICCV 2019, eq. 1-3). docs/compose.md walks through it block by block.

    python recipes/fewshot_prototypes_coco20i.py --demo                     # CPU, minutes, no download
    torchrun --nproc_per_node=8 recipes/fewshot_prototypes_coco20i.py --data-root /data/COCO2014 --fold 0

    z = E(image)                                       query and supports, frozen VAE
    f = ⊕_t,l UNet_l(√ᾱ_t z + √(1−ᾱ_t) ε, t, CLIP(""))  layers l at timesteps t, one frozen U-Net call
    e = g(f)                                           trainable: 3×3 conv, GroupNorm, ReLU, 1×1 conv
    p_bg, p_fg = mean_shots MAP(e_s, 1 − m_s), MAP(e_s, m_s)          PANet eq. 1-2
    logits = 20 · cos(e_q, p) ↑ (H, W);   L = CE(logits, m_q) + Dice(logits_fg − logits_bg, m_q)

| choice | here | why |
|---|---|---|
| features | up.1, up.2 (image strides 16, 8 at 512²), t = 50 and 261, timesteps folded into channels | DIFT's t = 261 for semantics, a low t for detail |
| prototypes | masked average pooling, mask area-resized to the features, ignore pixels left out | PANet eq. 1; one fg and one bg prototype, averaged over the shots (eq. 2) |
| scoring | cosine × 20, softmax over {bg, fg} | PANet eq. 3, α = 20 |
| loss | CE + Dice on the query, bilinear logits at the mask's size; no PANet alignment loss | PANet's CE; Dice for COCO's small objects |
| precision | frozen SD in bf16 on a GPU (fp32 on a CPU), features and head in fp32 | the frozen side is most of the FLOPs |
| evaluation | 1000 episodes per fold, 1- and 5-shot, mIoU over the 20 test classes and FB-IoU | HSNet's protocol |
| demo | the package's pre-trained tiny SD (`--random-demo-model`: a random U-Net pre-trained here, 100 denoising steps, kept in the checkpoint); 128² images (taps 8² and 16²); two classes in every image, only the supports tell which is asked for; control: supports of the other | no download; at 64² the taps are 4² and 8² |
"""

import time

from unet_seg.cli import parse_recipe_args, recipe_parser, run

TAPS, TIMESTEPS, EVAL_SHOTS = ("up.1", "up.2"), (50, 261), (1, 5)
DEMO = dict(size=128, steps=1000, batch_size=8, lr=1e-3, dim=64, eval_items=200, pretrain_steps=100)  # pre-training: random model only
REAL = dict(size=512, steps=20000, batch_size=4, lr=1e-4, dim=256, eval_items=1000, pretrain_steps=0)


def parse_args(argv=None):
    p = recipe_parser(__doc__.split("\n\n")[0], DEMO, REAL, out="runs/fewshot_prototypes", eval_items="test episodes per shot setting",
                      all_items=False, predict=False)  # evaluates episodes, exports nothing
    p.add_argument("--data-root", help="COCO-20i root in the HSNet layout (see unet_seg.data.coco20i)")
    p.add_argument("--fold", type=int, default=0, choices=range(4), help="fold 0..3: its classes are held out")
    p.add_argument("--shots", type=int, default=1, help="supports per training episode")
    p.add_argument("--dim", type=int, help=f"embedding width (default {REAL['dim']}; demo {DEMO['dim']})")
    p.add_argument("--pretrain-steps", type=int, help="demo with --random-demo-model: denoising steps that pre-train its U-Net")
    return parse_recipe_args(p, argv, DEMO, REAL, data=["--data-root"], dataset="COCO-20i")


if __name__ == "__main__":
    parse_args()  # usage errors before the seconds that importing torch takes
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unet_seg import demo, load_sd
from unet_seg.data.fewshot import fewshot_episodes
from unet_seg.losses import cross_entropy, dice_loss
from unet_seg.metrics import few_shot_scores
from unet_seg.prototypes import cosine_logits, fg_bg_prototypes
from unet_seg.segmentation import episode_tensors, evaluate_episodes
from unet_seg.taps import fold_timesteps, timestep_features
from unet_seg.train import (backward_and_step, check_finite_everywhere, evaluation, finish_run, maybe_compile, progress, resumable_loader,
                             resume_latest, same_init_on_every_rank, sanity_check, save_checkpoint, should_checkpoint, start_run,
                             training_batches, wrap_for_training)  # fmt: skip
from unet_seg.viz import image_to_uint8, overlay, save_grid

RED = np.array([[0, 0, 0], [255, 32, 32]], dtype=np.uint8)  # overlay palette: red foreground


@torch.no_grad()
def frozen_features(sd, context, images: torch.Tensor) -> torch.Tensor:
    """images [N, 3, H, W] -> [N, K·ΣC, h, w]: the taps at every timestep, resized to the finest tap."""
    feats = timestep_features(sd.unet, sd.vae.encode(images), TIMESTEPS, context, TAPS, schedule=sd.schedule)
    size = feats[TAPS[-1]].shape[-2:]
    return torch.cat([F.interpolate(fold_timesteps(feats[n]).float(), size=size, mode="bilinear") for n in TAPS], 1)


def embedding_head(in_channels: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, dim, 3, padding=1), nn.GroupNorm(32, dim), nn.ReLU(), nn.Conv2d(dim, dim, 1))


def episode_logits(head, sd, context, query, supports, support_masks) -> torch.Tensor:
    """An episode batch -> query logits [G, 2 (bg, fg), H, W]: one frozen feature call for all images."""
    g, s = supports.shape[:2]
    e = head(frozen_features(sd, context, torch.cat([query, supports.flatten(0, 1)])))
    prototypes = fg_bg_prototypes(e[g:].unflatten(0, (g, s)), support_masks)
    return F.interpolate(cosine_logits(e[:g], prototypes), size=query.shape[-2:], mode="bilinear")


def main(argv=None) -> dict:
    args = parse_args(argv)
    job = start_run(args, demo=f"tiny SD-structured U-Net {'pre-trained here' if args.random_demo_model else 'and text encoder, pre-trained'}, "
                    "a frozen 8x8 block codec for the VAE, synthetic few-shot episodes", real="--model <SD 2.x> --data-root <COCO-20i>")  # fmt: skip
    device, random_demo = job.device, args.demo and args.random_demo_model  # the random demo U-Net is pre-trained here, saved with the head
    task = fewshot_episodes(args.fold, None if args.demo else args.data_root, size=args.size, train_shots=args.shots,
                            test_shots=EVAL_SHOTS, test_episodes=args.eval_items, seed=args.seed)  # fmt: skip

    with same_init_on_every_rank(args.seed):  # ---- frozen SD (demo: the package's pre-trained tiny SD), empty prompt once
        sd = demo.demo_sd(args.random_demo_model) if args.demo else load_sd(args.model, dtype=torch.bfloat16 if device.type == "cuda" else None, device=device)
        demo.pretrain_unless_resuming(sd, out=args.out, resume=args.resume, steps=args.pretrain_steps if random_demo else 0, size=args.size,
                                      seed=args.seed, device=device, batch_size=8)  # fmt: skip
        sd.vae.to(device).eval().requires_grad_(False)  # the U-Net: frozen on `device` by the call above
        context = sd.encode_prompt([""]).to(device)
        sd.unet.features = maybe_compile(sd.unet.features, args.compile)  # what timestep_features calls
        channels = len(TIMESTEPS) * sum(sd.unet.feature_info(n).channels for n in TAPS)
        head = embedding_head(channels, args.dim).to(device).train()  # ---- the trainable embedding head
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=1e-2, fused=True)
    models = {"head": head, **({"unet": sd.unet} if random_demo else {})}
    step = resume_latest(args.out, models, optimizer=opt, steps=args.steps) if args.resume else 0
    forward = wrap_for_training(head, compile=args.compile)

    loader = resumable_loader(task.train, args.batch_size, args.seed, num_workers=args.workers)  # ---- train: the fold's training classes

    def one_step(batch) -> torch.Tensor:
        query, query_mask, supports, support_masks, _ = episode_tensors(batch, device)
        logits = episode_logits(forward, sd, context, query, supports, support_masks)
        loss = cross_entropy(logits, query_mask) + dice_loss(logits[:, 1] - logits[:, 0], query_mask, ignore_index=255)
        return check_finite_everywhere(backward_and_step(opt, head.parameters(), loss, max_norm=1.0), "CE + Dice")

    predict = lambda *episode: episode_logits(head, sd, context, *episode).argmax(1)  # noqa: E731
    evaluate = lambda data: evaluate_episodes(predict, data, task.num_labels, device)  # noqa: E731
    sanity_check(args, out=args.out, step=step, loader=loader, train=one_step, models=models, optimizer=opt, evaluate=evaluate,
                 targets={f"{k}-shot": d for k, d in task.test.items()})
    bar = progress(total=args.steps, initial=step, desc="prototypes")
    for step, epoch, batch in training_batches(loader, step, args.steps):
        loss = one_step(batch)
        bar.update(), bar.set_postfix(loss=f"{loss.item():.4f}")
        if should_checkpoint(step, args.save_every, args.steps):
            save_checkpoint(args.out, step, models, optimizer=opt, epoch=epoch, extra={"args": str(vars(args))}, keep_last=2, final=args.demo and step == args.steps)
    bar.close()
    train_time = time.perf_counter() - job.started
    # ---- evaluate: 1- and 5-shot on the held-out classes (demo: and the control, supports of the other class)
    metrics, rows = {}, []
    runs = {f"prototypes {k}-shot": d for k, d in task.test.items()} | ({"control: 1-shot, supports of the query's other class": task.control} if task.control else {})
    for name, data in runs.items():
        with evaluation(head, seed=args.seed, device=device):
            conf, shown = evaluate(data)
        metrics[name] = few_shot_scores(conf, task.test_labels)
        rows = rows or [[image_to_uint8(q), overlay(s, sm, RED, 0.7), overlay(q, m, RED, 0.7), overlay(q, qm, RED, 0.7)]
                        for q, s, sm, m, qm in shown]  # fmt: skip
    save_grid(rows, args.out / "episodes.png", titles=["query", "support", "prediction", "ground truth"], scale=2)
    return finish_run(job, metrics, out=args.out, title=f"Prototypes of frozen SD features, fold {args.fold}" + (" (DEMO: synthetic)" if args.demo else ""),
                      wrote="episodes.png", train_seconds=train_time)


if __name__ == "__main__":
    run(main)
