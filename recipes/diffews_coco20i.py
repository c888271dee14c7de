"""DiffewS few-shot segmentation (OI2M) on COCO-20i, or on synthetic episodes with `--demo`.

Zhu et al., "Unleashing the Potential of the Diffusion Model in Few-shot Semantic Segmentation",
NeurIPS 2024 (arXiv 2410.02369). Official code: aim-uofa/DiffewS (digest of what it does:
../shared/design/fidelity/diffews-official.md; the paper's numbers: fidelity/numbers.md).

    python recipes/diffews_coco20i.py --demo                                    # CPU, minutes, no download
    torchrun --nproc_per_node=8 recipes/diffews_coco20i.py \\
        --model stabilityai/stable-diffusion-2-1 --data-root /data/coco20i --fold 0 --shots 7

Method (one episode = a query and K supports of one class, all through the U-Net in one batch):

    z_q = E(query), z_s = E(support), m_s = E(white-on-black support mask)     VAE frozen
    x   = [z_q, cat(z_s1, m_s1), .., cat(z_sK, m_sK)]        query: pretrained conv_in (4 channels);
                                                          supports: their own conv_in (8 channels)
    out = UNet(x, t = 1, context = CLIP(""), self-attention = KV fusion)      query attends to [q; s1..sK]
    L   = ‖out_query − (−E(query mask))‖²                                      latent MSE, query only
    p   = mean_c ⌊255·(D(−out_query)_c + 1)/2⌋ / 255;  mask = p > 0.25 · max_c,pixels  relative threshold

| setting | paper | official code | here | why |
|---|---|---|---|---|
| backbone | SD 2.1, U-Net fine-tuned | SD 2.1 (768-v), all U-Net parameters; VAE, text encoder frozen | same | |
| query input | image latent (Fig. 1c caption: + query mask) | 4-ch pretrained `conv_in`, image latent only | same (`UNet.add_support_conv_in`, `support=` rows) | the code is unambiguous |
| support input | concat of image and mask latents (Fig. 4) | separate 8-ch `conv_in_ref` = [W, W]/2, bias copied | same | |
| mask rendering | white on black (Fig. 5a) | ×2−1, 3 channels | same | |
| interaction | KV fusion self-attention (Fig. 2d) | bank in all 16 self-attention layers | every self-attention layer | |
| N-shot inference | all supports; "sample" trick in App. Table 6 | all K·L support tokens (`*_nosample.sh`) | all; `--support-sampling` keeps L of K·L | official scripts |
| generation, timestep | one step image to mask (OI2M) | t = 1 in training and test, no noise | same | |
| target | −E(query mask) | posterior **sample** in training, mean at test | same | |
| VAE in training | – | encodes all four every step (no augmentation: 512² squash) | same; `--cache-dir` encodes each image and (image, class) mask once and draws μ + σ·ε | the same distribution (note 5) |
| text context | empty prompt | "" padded to 77 tokens in training, unpadded (2 tokens) at test | same (the causal encoder's first 2 rows) | official code |
| precision | – | fp16 autocast training, fp32 evaluation | bf16 autocast training, fp32 U-Net at test; frozen VAE bf16 on a GPU | bf16: fp16's speed with fp32's range |
| optimiser | – | AdamW (0.9, 0.999), wd 1e-2, ε 1e-8, clip 1.0 | same | |
| learning rate | not stated | launcher 1e-5 (argparse default 3e-5), linear to 1e-7, no warm-up | 1e-5, linear to 1e-7 | the only released run |
| iterations, batch | strict COCO-20i: 10 000 its, total batch 16 (4 GPUs × accumulation 4) | launcher 20 000 × 4, argparse 30 000 × 2 | 10 000 its, 2 episodes × 8 GPUs = 16 | the paper's strict setting |
| supports per batch | – | episode 0's supports for the whole batch (needs batch 1) | each episode its own | a fix; equal at batch 1 |
| training shots | DiffewS: 1; DiffewS-n: 1..7 (Table 7) | k ~ U{1..nshot}, random subset; launcher nshot 2 | `--shots` 1 (DiffewS) or 7 (DiffewS-n) | the paper's Table 2 models |
| binarisation | relative τ_r = 0.25 (App. Table 3, 47.69) | decode, clamp, uint8 truncation, mean_c > 0.25·max over channels and pixels | same | |
| evaluation | COCO-20i, 1000 episodes/fold, mIoU over 20 classes | 512² squash, scored at 512², 255 as background | same; 255 kept as ignore | COCO masks rarely hold 255 |

Notes. (1) The official loop takes the supports of the first episode of each batch only, and
its attention bank splits supports across queries when the query batch is above 1; here every
episode has its own supports. (2) The official script regresses the U-Net output on −z directly,
with no noise and no schedule algebra (its β ≡ 1 v-prediction scheduler makes x̂0 = −v), so
`unet_seg.diffusion`'s parameterisations are not involved. (3) `--demo` cannot download SD:
it fine-tunes the package's pre-trained tiny SD (`--random-demo-model`: random weights) at lr
1e-3, and SD's frozen VAE is replaced by the frozen, weight-free `BlockCodec` (8×8 block colour means + texture
energy; bilinear decoding): a tiny AutoencoderKL trained for 300 CPU steps reconstructed the
synthetic images as a grey blur, and on its latents nothing beat a constant prediction.
(4) The demo's episodes are built so that the answer depends on the support: every query holds
two objects of two classes of the split, painted in random order, and only the support's class
is the target; the control pairs each query with supports of its *other* class. A model that
finds objects without reading its supports scores the same on both rows. Measured (200
episodes, one CPU thread): 1500 steps, the default (381 s), 1-shot 40.1 mIoU, 5-shot 40.2,
control 15.7, baselines 6.9 / 4.8 (it reads them); 600 steps 31.2, control 28.6 (not yet).
docs/recipes/diffews.md has the random-start rows.
(5) Training never augments (512² squash, no crop or flip), so each image's and
each (image, class) mask's VAE posterior N(μ, σ²) is fixed: `--cache-dir DIR` encodes them once
(`unet_seg.latent_cache`, reusable across runs with the same VAE and size) and draws z = μ + σ·ε
each step, the same numbers as the uncached step under the same ε; four of an episode's VAE
passes go. Off by default, though as faithful: a default run writes nothing outside --out, and
the cache is ≈ 20 GB at 512² (64 KiB per image or mask; one folder serves every fold and shot
setting). Evaluation still encodes (posterior means): the same argument holds there, but each
test episode is encoded once per evaluation, so a cache would only save --val-every's repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path

from unet_seg.cli import add_validation, parse_recipe_args, recipe_parser, run

TIMESTEP = 1  # official --train_timestep default
THRESHOLD_RATIO = 0.25  # paper appendix Table 4
EVAL_SHOTS = (1, 5)
LR_END = 1e-7  # diffusers' polynomial schedule, power 1: linear to 1e-7
DEMO = dict(size=64, steps=1500, batch_size=8, lr=1e-3, eval_items=200)  # 300 steps find objects, 1500 read supports
REAL = dict(size=512, steps=10000, batch_size=2, lr=1e-5, eval_items=1000)


def parse_args(argv=None) -> argparse.Namespace:
    p = recipe_parser(
        "DiffewS (OI2M) few-shot segmentation: train on a fold's training classes, evaluate 1- and 5-shot mIoU / "
        "FB-IoU on its held-out classes. --demo runs on CPU with tiny models (a pre-trained SD, else random) and synthetic episodes "
        "(no download); otherwise give --model and --data-root.",
        DEMO, REAL, out="runs/diffews", eval_items="test episodes per shot setting", all_items=False,
    )  # fmt: skip
    p.add_argument("--data-root", help="COCO-20i root in the HSNet layout (see unet_seg.data.coco20i)")
    p.add_argument("--fold", type=int, default=0, choices=range(4), help="fold 0..3: its 20 (demo: 5) classes are held out")
    p.add_argument("--shots", type=int, default=1, help="training draws 1..SHOTS supports per step: 1 trains DiffewS, "
                   "7 DiffewS-n (paper Table 2)")
    p.add_argument("--support-sampling", action="store_true", help="K-shot test: keep L random support tokens of "
                   "K·L per layer (paper App. Table 6 'sample'); default all, as the official evaluation")
    add_validation(p, "1-shot test episodes", 100)
    p.add_argument("--cache-dir", type=Path, help="encode each training image's and mask's VAE posterior once into DIR "
                   "(reused by later runs with the same VAE and --size) and sample training latents from it; default: "
                   "encode every step")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, help="replay each training step as one CUDA graph "
                   "(one graph per support count): the host no longer paces the GPU; default: on where the run has a GPU")
    p.predict_group.add_argument("--support", nargs=2, action="append", metavar=("IMAGE", "MASK"),
                                 help="a support image and its 0/255 mask of the object to find; repeat for K shots")
    args = parse_recipe_args(p, argv, DEMO, REAL, data=["--data-root"], dataset="COCO-20i")
    if args.predict and not args.support:
        p.error("--predict segments what the supports show: give --support IMAGE MASK (repeat for K shots)")
    if args.shots < 1:
        p.error("--shots must be >= 1")
    if args.cache_dir and args.demo:
        p.error("--cache-dir caches COCO-20i's VAE posteriors; the demo's synthetic episodes are each drawn once")
    return args


if __name__ == "__main__":
    parse_args()  # usage errors here, before the seconds that importing torch takes
import numpy as np
import torch

from unet_seg import load_sd
from unet_seg.attention import kv_fusion_procs, self_attention_layers
from unet_seg.codecs import mask_to_image
from unet_seg.data.fewshot import cached_episodes, fewshot_episodes
from unet_seg.demo import BlockCodec, demo_sd
from unet_seg.latent_cache import sample_latent
from unet_seg.losses import latent_mse
from unet_seg.metrics import few_shot_scores, iou_table
from unet_seg.predict import Predictor, default_device, export_sd, load_checkpoint_for_export, predict_files, read_export, resize_image, support_pairs
from unet_seg.segmentation import episode_tensors, evaluate_episodes, resize_labels
from unet_seg.train import (
    CudaGraphStep, autocast, backward_and_step, check_finite_everywhere, evaluation, finish_run, head, is_main, print0, progress,
    resumable_loader, resume_latest, same_init_on_every_rank, sanity_check, save_checkpoint, should_checkpoint, start_run,
    training_batches, unwrap, use_cuda_graph, wrap_for_training,
)  # fmt: skip
from unet_seg.viz import image_to_uint8, overlay, save_grid

MASK_COLOUR = np.array([[0, 0, 0], [255, 32, 32]], dtype=np.uint8)  # overlay palette: red foreground


def unet_input(vae, query, supports, support_masks, sample: bool, query_mask=None):
    """query [G, 3, H, W], supports [G, S, 3, H, W], support_masks [G, S, H, W] (checked already:
    `episode_tensors`) -> `episode_latents` of one VAE call (no host sync) on [queries, supports,
    support masks, query masks (with `query_mask` [G, H, W])] as white-on-black images."""
    masks = support_masks.flatten(0, 1) if query_mask is None else torch.cat([support_masks.flatten(0, 1), query_mask])
    images = torch.cat([query, supports.flatten(0, 1), mask_to_image(masks, check=False).to(query.dtype)])
    return episode_latents(vae.encode(images, sample=sample), *supports.shape[:2])


def episode_latents(z, g: int, s: int):
    """Latents [G + 2·G·S (+ G), 4, h, w] in `unet_input`'s order -> (grouped batch [G·(1+S), 8, h, w]:
    per episode cat(z_q, 0), whose zeros the query's 4-channel conv_in never reads, then
    cat(z_s, E(mask_s)); the query masks' latents [G, 4, h, w] where z holds them, else None)."""
    z_q, z_s, m = z[:g, None], z[g : g * (1 + s)].unflatten(0, (g, s)), z[g * (1 + s) :]
    m_s = m[: g * s].unflatten(0, (g, s))
    x = torch.cat([torch.cat([z_q, torch.zeros_like(z_q)], dim=2), torch.cat([z_s, m_s], dim=2)], dim=1)
    return x.flatten(0, 1), (m[g * s :] if len(m) > g * s else None)


def query_prediction(unet, x, context, num_supports: int, subsample: bool) -> torch.Tensor:
    """One U-Net call with KV fusion on every self-attention layer, queries through the
    pretrained conv_in and supports through conv_in_support -> query outputs [G, 4, h, w]."""
    procs = kv_fusion_procs(self_attention_layers(unwrap(unet).attention_names), num_supports, subsample=subsample)
    t = torch.full((x.shape[0],), TIMESTEP, device=x.device)
    support = torch.arange(x.shape[0], device=x.device) % (1 + num_supports) != 0
    out = unet(x, t, context.expand(x.shape[0], -1, -1), procs=procs, support=support)
    return out.unflatten(0, (-1, 1 + num_supports))[:, 0]


def binarise(image: torch.Tensor, ratio: float = THRESHOLD_RATIO) -> torch.Tensor:
    """Decoded mask image [G, 3, H, W] -> mask [G, H, W] in {0, 1}, as the official evaluation:
    each channel clamped to [-1, 1] and stored as 8-bit grey (truncated), foreground where the
    channel mean exceeds `ratio` × the maximum over channels and pixels."""
    p = ((image.float().clamp(-1, 1) + 1) * 127.5).floor() / 255  # uint8 truncation
    peak = p.flatten(1).amax(1).view(-1, 1, 1)
    return (p.mean(1) > ratio * peak).long()


@torch.no_grad()
def predict_masks(unet, vae, context, query, supports, support_masks, subsample: bool = False) -> torch.Tensor:
    """K-shot episodes -> query masks [G, H, W] in {0, 1}: one fp32 U-Net call on posterior means
    with the unpadded empty prompt (`context` [1, 2, D]), all support tokens unless `subsample`,
    decode, `binarise` (the official evaluation)."""
    x, _ = unet_input(vae, query, supports, support_masks, sample=False)
    pred = query_prediction(unet, x.float(), context, supports.shape[1], subsample=subsample and supports.shape[1] > 1)
    return binarise(vae.decode(-pred.to(x.dtype)))


def train_step(model, unet, vae, context, opt, query, query_mask, supports, support_masks) -> torch.Tensor:
    """One optimiser step of the latent regression on K-shot episodes (`model`: the U-Net as
    called, possibly compiled or DDP-wrapped; `unet`: its parameters) -> the loss. No host sync
    (a CUDA graph can hold it): a non-finite loss skips the update on the device; the caller
    reads the loss (`check_finite_everywhere`) to stop the run."""
    with torch.no_grad():  # the frozen VAE: posterior samples of all four, as the official script
        x, z_query_mask = unet_input(vae, query, supports, support_masks, sample=True, query_mask=query_mask)
    return regression_step(model, unet, context, opt, x, -z_query_mask, supports.shape[1])


def cached_train_step(model, unet, context, opt, query, query_mask, supports, support_masks) -> torch.Tensor:
    """`train_step` on the episodes' posteriors [..., 2, 4, h, w] (μ, σ) from the latent cache:
    z = μ + σ·ε in the order and dtype of train_step's VAE call, so that under the same ε the
    two steps are the same step."""
    post = torch.cat([query, supports.flatten(0, 1), support_masks.flatten(0, 1), query_mask])
    x, z_query_mask = episode_latents(sample_latent(post).float(), *supports.shape[:2])
    return regression_step(model, unet, context, opt, x, -z_query_mask, supports.shape[1])


def regression_step(model, unet, context, opt, x, target, num_supports: int) -> torch.Tensor:
    with autocast(x.device):
        pred = query_prediction(model, x, context, num_supports, subsample=False)
    return backward_and_step(opt, unet.parameters(), latent_mse(pred.float(), target), max_norm=1.0)


def evaluate(unet, data, *, vae, context, num_labels: int, device, seed: int, subsample: bool = False):
    """This rank's share of `data` (K-shot episodes) -> all-rank confusion matrices
    {name: [num_labels, num_labels]} for DiffewS and two baselines, plus up to 4 episodes to draw.
    Runs in `train.evaluation` (eval mode, own RNG stream seeded by `seed` for the support
    subsampling), so that evaluating mid-training leaves the run unchanged."""

    def predict(query, supports, support_masks):
        mask = predict_masks(unet, vae, context, query, supports, support_masks, subsample)
        return {"DiffewS": mask, "baseline: support mask": (support_masks[:, 0] == 1).long(), "baseline: all foreground": torch.ones_like(mask)}

    with evaluation(unet, seed=seed, device=device):
        return evaluate_episodes(predict, data, num_labels, device)


def export(sd, args) -> None:
    """RUN/model: the fine-tuned SD as a diffusers folder, the recipe's settings in config.json (rank 0)."""
    if is_main():
        config = dict(recipe="diffews", size=args.size, vae="block codec" if args.demo else "vae", support_sampling=args.support_sampling, seed=args.seed)
        if not args.demo and next(sd.vae.parameters()).dtype != torch.float32:  # the frozen VAE as it was published, not its bf16 copy
            sd = dataclasses.replace(sd, vae=load_sd(args.model, components=["vae"]).vae)
        print0(f"exported the fine-tuned model to {export_sd(sd, args.out / 'model', config)}")


def load_trained(run, device=None) -> Predictor:
    """A trained run (or its model/ folder) -> predictor(query, supports=[(image, mask), ...]) ->
    the query's 0/1 mask [H, W] at its own size; images and masks as paths or tensors."""
    device, (folder, config, _) = default_device(device), read_export(run, "diffews")
    parts = ["unet", "text_encoder", "tokenizer"] + (["vae"] if config["vae"] == "vae" else [])
    sd = load_sd(folder, components=parts, device=device)
    vae = sd.vae if config["vae"] == "vae" else BlockCodec()
    unet, context, size = sd.unet.eval(), sd.encode_prompt([""])[:, :2], (config["size"],) * 2

    def segment(query, supports=()):
        s, m = (torch.stack(x)[None].to(device) for x in support_pairs(supports, size))  # [1, K, 3, S, S], [1, K, S, S]
        with evaluation(unet, seed=config["seed"], device=device):
            mask = predict_masks(unet, vae, context, resize_image(query, size)[None].to(device), s, m, config["support_sampling"])
        return resize_labels(mask, query.shape[-2:])[0].cpu()

    return Predictor(segment, ("background", "foreground"), MASK_COLOUR, binary=True, untinted=0, config=config)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.predict:
        return predict_files(load_trained(args.run), args.predict, args.out, supports=args.support)
    job = start_run(
        args,
        demo=f"tiny {'random-weight' if args.random_demo_model else 'pre-trained'} SD-structured U-Net and text encoder, a frozen 8x8 block codec in place of SD's VAE, "
        "synthetic few-shot episodes",
        real="--model <SD 2.x> --data-root <COCO-20i>",
    )
    device = job.device
    args.cuda_graph = use_cuda_graph(args.cuda_graph, device, "diffews_coco20i.py")  # on a GPU: tested equal to the eager step there

    # ---- data: the fold's training classes for training, its held-out classes for evaluation (demo: note 4)
    task = fewshot_episodes(args.fold, None if args.demo else args.data_root, size=args.size, train_shots=args.shots,
                            test_shots=EVAL_SHOTS, test_episodes=args.eval_items, seed=args.seed)  # fmt: skip
    test_data, test_labels = task.test, task.test_labels
    print0(f"fold {args.fold}: train classes {len(set(task.train.classes))}, test classes {list(test_labels)}")

    # ---- models: SD U-Net + an 8-channel support conv_in, frozen VAE, empty-prompt context computed once
    with same_init_on_every_rank(args.seed):  # then each rank its own shot counts and posterior noise
        sd = demo_sd(args.random_demo_model) if args.demo else load_sd(args.model, vae_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        unet, vae = sd.unet, sd.vae
        unet.add_support_conv_in(8).to(device).train()
    vae.to(device)
    if device.type == "cuda":  # NHWC convolutions: -26% U-Net time on an H100 (benchmarks/NOTES.md)
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    sd.text_encoder.to(device).eval()
    context = sd.encode_prompt([""])  # [1, 77, D], padded as in training
    test_context = context[:, :2]  # unpadded [BOS, EOS] at test (official): the causal encoder's first 2 rows
    eval_kw = dict(vae=vae, context=test_context, num_labels=task.num_labels, device=device, seed=args.seed)
    lr = torch.tensor(args.lr, device=device) if args.cuda_graph else args.lr  # a graph reads the schedule's lr from the GPU
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, fused=True,
                            capturable=args.cuda_graph)  # fmt: skip
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, min(1.0, LR_END / args.lr), total_iters=args.steps)

    models = {"unet": unet}
    step = resume_latest(args.out, models, optimizer=opt, scheduler=sched, steps=args.steps) if args.resume else 0
    if args.export:
        load_checkpoint_for_export(args.out, args.export, models)
        return export(sd, args)
    vae.eval().requires_grad_(False)
    train_data = cached_episodes(task.train, vae, args.cache_dir, num_workers=args.workers) if args.cache_dir else task.train
    forward = wrap_for_training(unet, compile=args.compile)
    if args.compile and not args.demo:  # the VAE is most of an episode's FLOPs (3 encodes + 1 decode at 512²)
        vae.encoder.compile()
        vae.decoder.compile()
    if args.cache_dir:  # note 5: each posterior encoded once, sampled every step
        train = functools.partial(cached_train_step, forward, unet, context, opt)
    else:
        train = functools.partial(train_step, forward, unet, vae, context, opt)

    # ---- train: one-step query-mask latent regression, 1..shots supports per step
    loader = resumable_loader(train_data, args.batch_size, args.seed, num_workers=args.workers)

    def one_step(batch) -> tuple[torch.Tensor, int]:
        query, query_mask, supports, support_masks, _ = episode_tensors(batch, device, check=not args.cache_dir)
        s = int(torch.randint(1, args.shots + 1, ()))
        pick = torch.randperm(args.shots)[:s].to(device)
        loss = check_finite_everywhere(train(query, query_mask, supports[:, pick], support_masks[:, pick]), "latent MSE")
        sched.step()
        return loss, s

    sanity_check(args, out=args.out, step=step, loader=loader, train=one_step, models=models, optimizer=opt, scheduler=sched,
                 evaluate=lambda data: evaluate(unet, data, **eval_kw), targets={f"{k}-shot": d for k, d in test_data.items()})
    if args.cuda_graph:  # captured after the sanity check, which reloads the optimiser state a graph would hold
        train = CudaGraphStep(train, [forward], opt)
    bar = progress(total=args.steps, initial=step, desc="DiffewS")
    for step, epoch, batch in training_batches(loader, step, args.steps):
        loss, s = one_step(batch)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", shots=s)
        if should_checkpoint(step, args.save_every, args.steps):
            save_checkpoint(args.out, step, models, optimizer=opt, scheduler=sched, epoch=epoch, extra={"args": str(vars(args))}, keep_last=2, final=args.demo and step == args.steps)
        if args.val_every and step % args.val_every == 0 and step < args.steps:
            quick = head(test_data[1], args.val_items)
            conf, _ = evaluate(unet, quick, **eval_kw)
            miou = few_shot_scores(conf["DiffewS"], test_labels)["mIoU"]
            print0(f"step {step}: 1-shot mIoU {miou:.2f} on {len(quick)} held-out episodes")
    bar.close()
    if args.cuda_graph:
        train.close()  # before the process group goes: a live graph holding NCCL calls hangs destroy_process_group
    train_time = time.perf_counter() - job.started
    export(sd, args)

    # ---- eval: 1-shot and 5-shot on the held-out classes, next to the trivial baselines
    metrics, rows = {}, []
    for k, data in test_data.items():
        conf, shown = evaluate(unet, data, **eval_kw, subsample=args.support_sampling)
        for name, c in conf.items():
            if name == "DiffewS" or k == 1:  # baselines read the first support only: the same for every K
                metrics[f"{name} {k}-shot" if name == "DiffewS" else name] = few_shot_scores(c, test_labels)
        if k == 1:
            shown_labels = [0, *test_labels]
            print0(iou_table(conf["DiffewS"][shown_labels][:, shown_labels], [task.class_names[c] for c in shown_labels],
                             title="DiffewS 1-shot, IoU per class over all test episodes (the few-shot mIoU below: test classes only)"))
            rows = [
                [image_to_uint8(q), overlay(s, sm, MASK_COLOUR, 0.7), overlay(q, m, MASK_COLOUR, 0.7), overlay(q, qm, MASK_COLOUR, 0.7)]
                for q, s, sm, m, qm in shown
            ]
    if args.demo:
        conf, _ = evaluate(unet, task.control, **eval_kw)
        metrics["control: DiffewS 1-shot, supports of the query's other class"] = few_shot_scores(conf["DiffewS"], test_labels)
    if rows:
        save_grid(rows, args.out / "episodes.png", titles=["query", "support", "prediction", "ground truth"], scale=2)
    title = f"DiffewS fold {args.fold}, {len(test_data[1])} test episodes" + (" (DEMO: synthetic)" if args.demo else "")
    return finish_run(job, metrics, out=args.out, title=title, wrote="episodes.png", train_seconds=train_time)


if __name__ == "__main__":
    run(main)
