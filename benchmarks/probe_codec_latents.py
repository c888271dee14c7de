"""Are the DiGSeg demo's classes visible in what its VAE stand-in keeps? An oracle probe.

    python benchmarks/probe_codec_latents.py --seconds 90 --size 128       # CPU, one thread is enough

A small dilated conv net (six 3×3 layers of 64 channels, receptive field 17 latent blocks) is
trained supervised, with cross-entropy, on `unet_seg.demo.BlockCodec` latents of the demo's scenes
(`recipes/digseg_ade20k.py --demo`: 2–3 objects of distinct classes among `fold_split(0)[1]`) to
predict the 6 labels (background + five classes), its logits upsampled ×8; then mIoU on 200
held-out scenes, the objectness IoU (any class vs background), and the confusion among the
classes on the objects' pixels. High mIoU = the class identity is in the latents (a model that
can read them can segment by class); it says nothing about how fast a diffusion model learns it.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from unet_seg.data.synthetic import CLASS_NAMES, SemanticScenes, fold_split
from unet_seg.demo import BlockCodec
from unet_seg.metrics import confusion_matrix, iou_per_class


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--train-scenes", type=int, default=3000)
    a = p.parse_args()
    torch.manual_seed(0)
    classes = fold_split(0)[1]
    lookup = torch.full((256,), 255, dtype=torch.long)
    lookup[0], lookup[list(classes)] = 0, torch.arange(1, len(classes) + 1)

    def latents_and_labels(seed: int, n: int):
        scenes = SemanticScenes(seed, n, size=a.size, classes=classes, objects=(2, 3), distinct=True)
        items = [scenes[i] for i in range(n)]
        return BlockCodec().encode(torch.stack([x["image"] for x in items])), lookup[torch.stack([x["label"] for x in items])]

    z_train, y_train = latents_and_labels(0, a.train_scenes)
    z_test, y_test = latents_and_labels(1, 200)
    layer = lambda c_in, d: nn.Sequential(nn.Conv2d(c_in, 64, 3, padding=d, dilation=d), nn.GroupNorm(8, 64), nn.GELU())  # noqa: E731
    net = nn.Sequential(layer(4, 1), layer(64, 1), layer(64, 2), layer(64, 4), layer(64, 2), layer(64, 1), nn.Conv2d(64, 6, 1))
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    steps, start = 0, time.time()
    while time.time() - start < a.seconds:
        i = torch.randint(len(z_train), (32,))
        loss = F.cross_entropy(F.interpolate(net(z_train[i]), size=a.size, mode="bilinear"), y_train[i], ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    with torch.no_grad():
        pred = F.interpolate(net.eval()(z_test), size=a.size, mode="bilinear").argmax(1)
    conf = confusion_matrix(pred, y_test, 6)
    iou, fg = iou_per_class(conf), conf[1:, 1:].sum()
    objectness = fg / (conf[1:].sum() + conf[:, 1:].sum() - fg)
    print(f"{a.size}²: {steps} steps in {time.time() - start:.0f} s, loss {loss.item():.3f}; mIoU {100 * iou.nanmean():.1f}, "
          f"objectness IoU {100 * objectness:.1f}")  # fmt: skip
    for k, name in enumerate(["background"] + [CLASS_NAMES[c] for c in classes]):
        row = "" if k == 0 else "   object pixels labelled " + " ".join(f"{v:3.0f}%" for v in (100 * conf[k, 1:] / conf[k, 1:].sum()).tolist())
        print(f"  {name:18s} IoU {100 * iou[k]:5.1f}{row}")


if __name__ == "__main__":
    main()
