"""A stand-in for SD's web-scale pre-training, for the recipes' `--demo` modes (which cannot
download SD): a tiny U-Net taught, in CPU minutes, to denoise codec latents of unlabelled
synthetic scenes in many looks. `FormScenes`: synthetic scenes labelled by form, the task that
the block codec's latents can carry (DIFF's demo), with `caption_forms` for the pre-training.

    unet = UNet(TINY_SD2)
    pretrain_denoiser(unet, BlockCodec(), NoiseSchedule.sd("epsilon"), steps=200, size=64, seed=0,
                      condition=lambda labels: empty_prompt.expand(len(labels), -1, -1))
"""

from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import synthetic
from .data.synthetic import SemanticScenes, random_style
from .diffusion import NoiseSchedule, q_sample, training_target
from .train import progress


def pretrain_denoiser(
    unet: nn.Module,
    codec: nn.Module,
    schedule: NoiseSchedule,
    steps: int,
    size: int,
    seed: int,
    condition: Callable[[Tensor], Tensor],
    batch_size: int = 16,
    device: Union[str, torch.device] = "cpu",
) -> float:
    """Train `unet` for `steps` AdamW (lr 1e-3) steps on the schedule's target (ε or v, MSE) at
    t ~ U{0, …, T−1}, on `codec.encode` latents of `batch_size` scenes of
    `synthetic.SemanticScenes(seed + 7)` a step, each in its own `synthetic.random_style` look
    (a family that never holds a demo's test style). `condition(labels [B, H, W]) -> context
    [B, L, D]` gives the cross-attention context, e.g. the empty prompt or captions of the
    classes present. Every random number comes from one generator seeded `seed + 7`: the global
    RNGs are left alone. Leaves the U-Net frozen, in eval mode; returns the last loss."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    g = torch.Generator().manual_seed(seed + 7)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = schedule.to(device)
    unet.train().requires_grad_(True)
    for _ in progress(range(steps), desc="demo: pre-training the tiny U-Net"):
        scenes = []
        for _ in range(batch_size):  # a look, then a scene index, both from g
            look = SemanticScenes(seed + 7, 10**6, size, style=random_style(g))
            scenes.append(look[int(torch.randint(10**6, (), generator=g))])
        images, labels = (torch.stack(x).to(device) for x in zip(*scenes))
        with torch.no_grad():
            z0 = codec.encode(images)
            context = condition(labels)
        t = torch.randint(0, schedule.num_train_timesteps, (len(z0),), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g).to(device)
        loss = F.mse_loss(unet(q_sample(z0, noise, t, schedule), t, context), training_target(z0, noise, t, schedule))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    unet.eval().requires_grad_(False)
    return loss.item()


def whiten(embeds: Tensor) -> Tensor:
    """Class embeddings [C, P] -> [C, P]: centred over the vocabulary, decorrelated (ZCA, the
    rank-deficient directions dropped), normalised. For C <= P the rows form a regular simplex
    (pairwise cosine −1/(C−1)). For demos: a random text tower maps different prompts to nearly
    one direction (cosine 0.999), which pretrained CLIP does not."""
    x = embeds - embeds.mean(0)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = s > s[0] * 1e-4
    return F.normalize(u[:, keep] @ vh[keep], dim=-1)


FORM_CLASSES = ("background", *synthetic.FORMS)
_FORM_OF_CLASS = torch.tensor(
    [0] + [1 + synthetic.FORMS.index(n.split()[1]) for n in synthetic.CLASS_NAMES[1:]] + [255] * (256 - len(synthetic.CLASS_NAMES))
)


class FormScenes(torch.utils.data.Dataset):
    """`synthetic.SemanticScenes` labelled by form only (background + disc, ring, square, triangle,
    cross): the 8×8 block codec keeps a block's colour and texture *energy*, not its pattern, so
    the textures that split the 20 synthetic classes are invisible in its latents."""

    def __init__(self, seed: int, length: int, size: int, style: synthetic.Style):
        self.scenes = SemanticScenes(seed, length, size, style=style)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image, label = self.scenes[i]
        return image, _FORM_OF_CLASS[label]


def caption_forms(labels: Tensor, text_encoder, tokenizer) -> Tensor:
    """Captions of the forms present in each label map [B, H, W] ("disc, ring"), encoded -> [B, 77, D]."""
    forms = [_FORM_OF_CLASS[y.unique().cpu()].unique().tolist() for y in labels]
    captions = [", ".join(FORM_CLASSES[f] for f in present if 0 < f < 255) for present in forms]
    return text_encoder(tokenizer(captions).to(labels.device))
