"""Stand-ins for what the recipes' `--demo` modes cannot download: a tiny text-to-image SD
pre-trained on captioned synthetic scenes that ships with the package (`pretrained_tiny_sd`, the
demos' default; `python -m unet_seg.demo_pretrain` trains it again; `denoising_loss`, `sample`),
a tiny random-weight SD (`tiny_sd`, `--random-demo-model`; `demo_sd` picks one), a weight-free VAE
stand-in (`BlockCodec`) and, for the random model's web-scale pre-training,
a tiny U-Net taught in CPU minutes to denoise codec latents of unlabelled synthetic scenes in
many looks (`pretrain_denoiser`). `FormScenes`: synthetic scenes labelled by form, the task that
the block codec's latents can carry (DIFF's demo), with `caption_forms` for the pre-training.

    sd = tiny_sd()                                            # .unet .vae .text_encoder .tokenizer .schedule
    empty_prompt = sd.encode_prompt([""])                     # [1, 77, 64]
    pretrain_denoiser(sd.unet, sd.vae, sd.schedule, steps=200, size=64, seed=0,
                      condition=lambda labels: empty_prompt.expand(len(labels), -1, -1))

A recipe over frozen features does that once and keeps the U-Net in its checkpoints (save it
with the trained models), so that `--resume` restores it instead of pre-training again:

    pretrain_unless_resuming(sd, out=args.out, resume=args.resume, steps=200, size=64, seed=0, device=device)
    models = {"head": head, "unet": sd.unet}    # resume_latest(args.out, models, ...) restores both
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_images, check_multiple_of_8
from .errors import CheckpointError
from .data import synthetic
from .data.synthetic import SemanticScenes, random_style
from .diffusion import NoiseSchedule, ddim_sample, ddim_timesteps, q_sample, training_target
from .hub import build_with_weights, read_safetensors
from .models import TINY_SD2, TINY_SD2_TEXT, CLIPTextEncoder, CLIPTokenizer, UNet
from .models.unet import UNetConfig
from .sd import StableDiffusion
from .train import latest_checkpoint, print0, progress


class BlockCodec(nn.Module):
    """A frozen, weight-free stand-in for SD's VAE with its `encode` / `decode` interface, for
    `--demo` runs on a CPU, where a tiny VAE cannot be trained in minutes to encode images.

        encode: img [B, 3, H, W] in [-1, 1] -> z [B, 4, H/8, W/8]
                z[:, :3] = mean colour of each 8×8 block,  z[:, 3] = 4·(colour std in the block) − 1
        decode: z -> bilinear ×8 upsampling of z[:, :3], [B, 3, H, W]

    Constant images round-trip exactly; masks come back with their edges blurred over a block.
    `sample` and `generator` are accepted and ignored: the code is deterministic.
    """

    downscale = 8

    def encode(self, img: Tensor, sample: bool = False, generator=None) -> Tensor:
        check_images(img, "img")
        check_multiple_of_8(img.shape[2:], "img")
        mean = F.avg_pool2d(img, 8)
        var = (F.avg_pool2d(img.square(), 8) - mean.square()).clamp_min(0).mean(1, keepdim=True)
        return torch.cat([mean, 4 * var.sqrt() - 1], dim=1)

    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != 4 or not z.is_floating_point():
            raise ValueError(f"z must be floating point [B, 4, h, w], got {z.dtype} {tuple(z.shape)}")
        return F.interpolate(z[:, :3], scale_factor=8, mode="bilinear", align_corners=False)


def tiny_sd(unet: UNetConfig = TINY_SD2, prediction_type: str = "epsilon") -> StableDiffusion:
    """A random-weight SD 2.x-structured stand-in, weights drawn from the global torch RNG in this
    order: the U-Net (`unet` config), then the text encoder (`TINY_SD2_TEXT`, its tokenizer padding
    with "!" as SD 2.x's does). The VAE is the frozen, weight-free `BlockCodec`; the schedule
    SD's, in `prediction_type`. Move it with `sd.unet.to(device)` etc.; nothing is frozen."""
    return StableDiffusion(
        UNet(unet), BlockCodec(), CLIPTextEncoder(TINY_SD2_TEXT), CLIPTokenizer.from_bpe(pad_token="!"),
        NoiseSchedule.sd(prediction_type), source="tiny random weights (demo)",
    )  # fmt: skip


# The pre-trained demo model: a quarter of TINY_SD2's widths (3.25 M parameters) and a 2048-token
# BPE vocabulary (CLIP's first merges), so that both fit in 7 MB of fp16.
DEMO_UNET = replace(TINY_SD2, channels=(32, 64, 64, 64))
DEMO_TEXT = replace(TINY_SD2_TEXT, vocab_size=2048)
DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo_sd.safetensors"


def demo_tokenizer() -> CLIPTokenizer:
    """CLIP's BPE cut to `DEMO_TEXT.vocab_size` tokens (its first merges), padding with "!" as SD 2.x."""
    return CLIPTokenizer.from_bpe(pad_token="!", num_merges=DEMO_TEXT.vocab_size - 514)


def pretrained_tiny_sd(prediction_type: str = "epsilon", path: Union[str, Path, None] = None) -> StableDiffusion:
    """The demos' tiny SD with the weights shipped in the package (`DEMO_WEIGHTS`, fp16, loaded as
    float32): a `DEMO_UNET` U-Net and `DEMO_TEXT` text encoder trained together as a latent
    text-to-image model (ε objective) on captioned synthetic scenes (`synthetic.CaptionedScenes`)
    in `BlockCodec` latents, by `python -m unet_seg.demo_pretrain`; the file's metadata holds the
    commit and settings it was trained with (`sd.notes`). `prediction_type` sets the schedule's
    parameterisation (the weights predict ε). No download; the global RNG is left alone."""
    path = Path(path) if path is not None else DEMO_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no demo weights (python -m unet_seg.demo_pretrain writes them)")
    weights = read_safetensors([path])
    parts = {name: {k.removeprefix(name + "."): v for k, v in weights.items() if k.startswith(name + ".")} for name in ("unet", "text_encoder")}
    stray = sorted(k for k in weights if not k.startswith(("unet.", "text_encoder.")))
    if stray:
        raise CheckpointError(f"{path}: unexpected keys outside unet. and text_encoder.: {stray[:5]}")
    unet = build_with_weights(lambda: UNet(DEMO_UNET), parts["unet"], f"{path} (unet.)")
    text_encoder = build_with_weights(lambda: CLIPTextEncoder(DEMO_TEXT), parts["text_encoder"], f"{path} (text_encoder.)")
    return StableDiffusion(
        unet, BlockCodec(), text_encoder, demo_tokenizer(), NoiseSchedule.sd(prediction_type),
        source=f"tiny SD pre-trained on captioned synthetic scenes ({path.name})", notes=json.dumps(demo_metadata(path)),
    )  # fmt: skip


def demo_metadata(path: Union[str, Path, None] = None) -> dict:
    """The metadata of a demo weights file: {"commit", "settings" (JSON), ...} as the script wrote them."""
    from safetensors import safe_open

    with safe_open(str(path or DEMO_WEIGHTS), framework="pt") as f:
        return dict(f.metadata() or {})


@torch.no_grad()
def denoising_loss(sd: StableDiffusion, images: Tensor, captions: Sequence[str], timesteps: Sequence[int], seed: int = 0) -> Tensor:
    """Per-image ε-MSE of `sd` on `images` [B, 3, H, W] captioned `captions`, averaged over
    `timesteps`, with noise from a CPU generator seeded `seed` (the same noise for any captions,
    so two calls differ only in the text) -> [B]. Runs where `sd.unet` is."""
    device = next(sd.unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    z0 = sd.vae.encode(images.to(device))
    context = sd.encode_prompt(list(captions)).to(device)
    losses = []
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=g).to(device)
        tt = torch.full((len(z0),), int(t), device=device)
        pred = sd.unet(q_sample(z0, noise, tt, sd.schedule), tt, context)
        losses.append((pred.float() - training_target(z0, noise, tt, sd.schedule)).square().mean((1, 2, 3)))
    return torch.stack(losses).mean(0)


@torch.no_grad()
def sample(sd: StableDiffusion, captions: Sequence[str], size: int, steps: int = 25, guidance: float = 3.0, seed: int = 0) -> Tensor:
    """Images [B, 3, size, size] in [-1, 1] from `captions`: DDIM-trailing, `steps` steps,
    classifier-free guidance (ε_uncond + guidance·(ε_cond − ε_uncond), the empty prompt as the
    unconditional one), the codec's decoder; noise from a CPU generator seeded `seed`."""
    device = next(sd.unet.parameters()).device
    n = len(captions)
    context = sd.encode_prompt(list(captions) + [""] * n).to(device)
    x = torch.randn(n, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(seed)).to(device)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        cond, uncond = sd.unet(torch.cat([x, x]), torch.cat([t, t]), context).float().chunk(2)
        return uncond + guidance * (cond - uncond)

    z0 = ddim_sample(guided, x, ddim_timesteps(steps, spacing="trailing").to(device), sd.schedule)
    return sd.vae.decode(z0).clamp(-1, 1)


def demo_sd(random: bool, unet: UNetConfig = TINY_SD2, prediction_type: str = "epsilon") -> StableDiffusion:
    """The `--demo` runs' SD: `pretrained_tiny_sd`, or with `random` (`--random-demo-model`)
    `tiny_sd(unet)` drawn from the global RNG."""
    return tiny_sd(unet, prediction_type) if random else pretrained_tiny_sd(prediction_type)


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
        images, labels = (torch.stack([s[k] for s in scenes]).to(device) for k in ("image", "label"))
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


def pretrain_unless_resuming(
    sd: StableDiffusion,
    *,
    out,
    resume: bool,
    steps: int,
    size: int,
    seed: int,
    device: Union[str, torch.device] = "cpu",
    condition: Optional[Callable[[Tensor], Tensor]] = None,
    batch_size: int = 16,
) -> Optional[float]:
    """The frozen-feature demo pattern in one call: `pretrain_denoiser` on `sd.unet` (conditioned
    on the empty prompt unless `condition` is given) unless `resume` is set and `out` holds a
    checkpoint, whose copy of the U-Net `resume_latest` then restores (the caller saves the U-Net
    with its models). Leaves the U-Net frozen, in eval mode, on `device`; returns the last
    denoising loss, None when it skipped."""
    unet = sd.unet.to(device)
    loss = None
    if steps > 0 and not (resume and latest_checkpoint(out) is not None):
        if condition is None:
            empty = sd.encode_prompt([""]).to(device)
            condition = lambda labels: empty.expand(len(labels), -1, -1)  # noqa: E731
        loss = pretrain_denoiser(unet, sd.vae, sd.schedule, steps, size, seed, condition, batch_size, device)
        print0(f"demo: pre-trained the tiny U-Net for {steps} denoising steps on synthetic scenes (loss {loss:.3f})")
    unet.eval().requires_grad_(False)
    return loss


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

    def __getitem__(self, i: int) -> dict:
        item = self.scenes[i]
        return {**item, "label": _FORM_OF_CLASS[item["label"]]}


def caption_forms(labels: Tensor, text_encoder, tokenizer) -> Tensor:
    """Captions of the forms present in each label map [B, H, W] ("disc, ring"), encoded -> [B, 77, D]."""
    forms = [_FORM_OF_CLASS[y.unique().cpu()].unique().tolist() for y in labels]
    captions = [", ".join(FORM_CLASSES[f] for f in present if 0 < f < 255) for present in forms]
    return text_encoder(tokenizer(captions).to(labels.device))
