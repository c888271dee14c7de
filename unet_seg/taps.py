"""Named U-Net features (and attention maps) of a clean latent noised to K timesteps, in one
forward (`timestep_features`), or along a sequential stochastic DDIM-inversion trajectory with
per-step path control (`inversion_trajectory_features`, DIFF's official extractor).

    feats = timestep_features(unet, z0, [50, 250, 500], ctx, ["up.1", "up.2"],
                              schedule=schedule,
                              attention_maps=["up.1.attn.0.cross"])
    feats["up.1"]               # [B, 3, C, h, w]
    feats["up.1.attn.0.cross"]  # [B, 3, tokens, h, w]

Consumers that want one map per feature fold the K timesteps into channels:
`fold_timesteps(feats["up.1"])` -> [B, 3·C, h, w] (timestep-major: channels of t_0, then t_1, ...).
`unet.feature_info(name)` gives a feature's channels and stride without a forward pass.

Feature names are `unet.feature_names`; shapes for SD 1.x/2.x at 512² (64² latents) are listed
in `unet_seg/models/unet.py` (e.g. up.0 [1280, 16, 16], up.1 [1280, 32, 32], up.2 [640, 64, 64],
up.3 [320, 64, 64]). Attention maps take names from `unet.attention_names`; a layer of level i
has a (64/2^i)² grid at 512², e.g. `up.1.attn.0.cross` [77, 16, 16] (up.1 is level 2).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .attention import attention_map_capture
from .diffusion import NoiseSchedule, ddim_eta_step, eps_from_v, q_sample
from .models.layers import Procs, capturing, filled
from .models.unet import UNet


def timestep_features(
    unet: UNet,
    z0: Tensor,
    timesteps: Union[Sequence[int], Tensor],
    context: Tensor,
    names: Sequence[str],
    *,
    schedule: NoiseSchedule,
    attention_maps: Sequence[str] = (),
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    procs: Procs = None,
) -> dict[str, Tensor]:
    """Features of x_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε at each of K timesteps, from ONE `unet.features` call.

    z0 [B, C, h, w] clean latents; timesteps K ints in [0, T); context [B or 1, L, D];
    names ⊆ `unet.feature_names`; attention_maps ⊆ `unet.attention_names` (maps as in
    `attention.attention_map_capture`); noise ε broadcastable to [B, K, C, h, w] (e.g.
    [B, 1, C, h, w] to share one ε across timesteps), drawn from `generator` when None.
    Returns {name: [B, K, ...]}, index k matching `timesteps[k]`.

    The K noisy latents are stacked along the batch, timestep-major (row k·B + b), and the
    network stops after the deepest block that any requested feature or attention map needs.
    `procs` are passed through and see those B·K rows: processors that group consecutive rows,
    such as KV fusion's episodes, see whole groups at every timestep. Outputs are [B, K, ...]
    views of the stacked result (call `.contiguous()` where that matters).
    """
    if z0.ndim != 4:
        raise ValueError(f"z0 must be [B, C, h, w] latents, got shape {tuple(z0.shape)}")
    b, c, h, w = z0.shape
    t = torch.as_tensor(timesteps)
    if t.ndim != 1 or len(t) == 0 or t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"timesteps must be a non-empty 1-D sequence of ints, got {timesteps!r}")
    k = len(t)
    if not isinstance(timesteps, Tensor):
        if not all(0 <= s < schedule.num_train_timesteps for s in timesteps):
            raise ValueError(f"timesteps must lie in [0, {schedule.num_train_timesteps}), got {list(timesteps)}")
        t = filled([int(s) for s in timesteps], z0, dtype=torch.long)
    t = t.to(z0.device)
    if not names and not attention_maps:
        raise ValueError("ask for at least one feature (names) or attention map (attention_maps)")
    if context.ndim != 3 or context.shape[0] not in (1, b):
        raise ValueError(f"context must be [{b} or 1, L, D], got shape {tuple(context.shape)}")
    unknown = [n for n in attention_maps if n not in unet.attention_names]
    if unknown:
        raise ValueError(f"unknown attention layers {unknown}; choose from unet.attention_names")
    clash = [n for n in attention_maps if procs is not None and n in procs]
    if clash:
        raise ValueError(f"layers {clash} have a processor in procs and an attention map requested: choose one")
    if noise is None:
        noise = torch.randn((b, k, c, h, w), generator=generator, device=z0.device, dtype=z0.dtype)
    elif _broadcasts(noise.shape, (b, k, c, h, w)):
        noise = noise.expand(b, k, c, h, w)
    else:
        raise ValueError(f"noise must broadcast to [B, K, C, h, w] = {[b, k, c, h, w]}, got {list(noise.shape)}")

    t = t.repeat_interleave(b)  # [K·B], row k·B + b
    x_t = q_sample(z0.expand(k, b, c, h, w).flatten(0, 1), noise.transpose(0, 1).flatten(0, 1), t, schedule)
    context = context.expand(k, b, -1, -1).flatten(0, 1)
    capture_procs, maps = attention_map_capture(attention_maps, (h, w))
    blocks = list(dict.fromkeys([*names, *(n.split(".attn.")[0] for n in attention_maps)]))
    feats = unet.features(x_t, t, context, blocks, {**(procs or {}), **capture_procs})
    out = {n: feats[n] for n in names}
    out.update(maps)
    return {n: v.unflatten(0, (k, b)).transpose(0, 1) for n, v in out.items()}


def fold_timesteps(feats: Tensor) -> Tensor:
    """Timestep features [B, K, C, h, w] -> [B, K·C, h, w], channel k·C + c = feats[:, k, c]."""
    if feats.ndim != 5:
        raise ValueError(f"feats must be [B, K, C, h, w] (timestep_features' layout), got shape {tuple(feats.shape)}")
    return feats.flatten(1, 2)


def _broadcasts(shape: Sequence[int], target: Sequence[int]) -> bool:
    return len(shape) == len(target) and all(s in (1, t) for s, t in zip(shape, target))


def fuse_rows(x: Tensor, row_image: Tensor, row_mask: Tensor, n: int) -> Tensor:
    """`fuse_by_masks` for ragged prompt rows: x [R, ..., h, w] (row r of item row_image[r]),
    row_mask [R, H, W] (area-averaged to (h, w)) -> [n, ..., h, w] = Σ_r M_r·x_r / Σ_r M_r per item
    (0 where no mask covers a pixel)."""
    m = torch.nn.functional.interpolate(row_mask[:, None].float(), size=x.shape[-2:], mode="area").to(x.dtype)
    m = m.view(len(m), *([1] * (x.ndim - 3)), *x.shape[-2:])
    total = x.new_zeros(n, *m.shape[1:]).index_add_(0, row_image, m)
    return x.new_zeros(n, *x.shape[1:]).index_add_(0, row_image, m * x) / torch.where(total > 0, total, torch.ones_like(total))


def fuse_by_masks(x: Tensor, masks: Tensor) -> Tensor:
    """Path-controlled fusion (MultiDiffusion; DIFF eq. 2) of the outputs of P prompts:

        out = Σ_p M_p ⊙ x_p / Σ_p M_p            (0 where no mask covers a pixel)

    x [B, P, ..., h, w] (e.g. tapped features [B, P, K, C, h, w]); masks [B, P, H, W] of
    non-negative weights (e.g. {0, 1} region masks, with an all-ones mask for a global prompt),
    area-averaged to (h, w) when the sizes differ. Returns [B, ..., h, w].
    """
    if masks.ndim != 4 or x.ndim < 4 or x.shape[:2] != masks.shape[:2]:
        raise ValueError(f"x must be [B, P, ..., h, w] and masks [B, P, H, W] with the same B, P; got {tuple(x.shape)}, {tuple(masks.shape)}")
    if not masks.is_floating_point():
        masks = masks.float()
    if masks.shape[-2:] != x.shape[-2:]:
        masks = torch.nn.functional.interpolate(masks, size=x.shape[-2:], mode="area")
    m = masks.to(x.dtype).view(*masks.shape[:2], *([1] * (x.ndim - 4)), *x.shape[-2:])
    total = m.sum(1)
    return (m * x).sum(1) / torch.where(total > 0, total, torch.ones_like(total))


def inversion_trajectory_features(
    unet: UNet,
    z0: Tensor,
    row_image: Tensor,
    row_context: Tensor,
    row_mask: Tensor,
    names: Sequence[str],
    summed: Sequence[str] = (),
    *,
    steps: Sequence[tuple[int, int]],
    etas: Sequence[float],
    save_steps: Sequence[int],
    schedule: NoiseSchedule,
    guidance_scale: float,
    negative: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    procs: Procs = None,
) -> dict[str, Tensor]:
    """Features along a stochastic DDIM trajectory with per-step path control (DIFF's official
    feature extractor: MultiDiffusion-style fusion of each prompt's next latent, eq. 2).

    B trajectories start at the clean latents z0 [B, C, h, w]. Each has prompt rows: row r
    belongs to trajectory `row_image[r]` ([R] long, sorted, every trajectory at least one row), with
    text `row_context[r]` [L, D] and fusion weights `row_mask[r]` [h, w] (e.g. 1 for a global prompt,
    a class's region mask for its prompt). Step i evaluates the U-Net at `steps[i][0]` on every row
    plus the negative row of each trajectory in ONE call, guides each row,
    ε_r = ε_neg + guidance_scale·(ε_r − ε_neg), moves each row to `steps[i][1]` with `ddim_eta_step`
    (η = `etas[i]`, its own noise z), and fuses: x = Σ_r M_r·x_r / Σ_r M_r (rows of one trajectory).
    negative [B, L, D]: the negative prompt; None means the first row of each trajectory is also
    its negative (the same context: that row's guided ε is its own, and the pass is not repeated).
    A "v_prediction" schedule converts the U-Net output to ε (after guidance); an "epsilon" one
    uses it as ε whatever the model was trained for (what DIFF's official code does with SD 2.1:
    pass `NoiseSchedule(sd.schedule.alphas_cumprod, "epsilon")`).

    Returns {name: [B, S, ...]} at the S steps listed in save_steps (in that order): `names` from
    the negative row, `summed` added over the negative row and every prompt row of the trajectory
    (DIFF's "ca" features). Steps after the last saved one do not change them and are not run.
    """
    b, r = z0.shape[0], row_image.shape[0]
    if row_image.ndim != 1 or row_context.shape[0] != r or row_mask.shape != (r, *z0.shape[-2:]):
        raise ValueError(
            f"row_image [R], row_context [R, L, D] and row_mask [R, h, w] must agree with z0 {tuple(z0.shape)}; "
            f"got {tuple(row_image.shape)}, {tuple(row_context.shape)}, {tuple(row_mask.shape)}"
        )
    if not capturing(row_image):
        step = row_image.diff()
        if r == 0 or row_image[0] != 0 or row_image[-1] != b - 1 or ((step < 0) | (step > 1)).any():
            raise ValueError(f"row_image must be sorted and give every one of the {b} trajectories a row, got {row_image.tolist()}")
    counts = torch.zeros(b, dtype=torch.long, device=row_image.device).index_add_(0, row_image, torch.ones_like(row_image))
    if len(etas) != len(steps) or not save_steps or not all(0 <= i < len(steps) for i in save_steps):
        raise ValueError(f"need one eta per step and save_steps within the {len(steps)} steps")
    if schedule.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"schedule.prediction_type must be 'epsilon' or 'v_prediction', got {schedule.prediction_type!r}")
    first = torch.cumsum(counts, 0) - counts  # the first row of each trajectory
    if negative is None:
        neg, rows, context = first, slice(0, r), row_context
    else:
        neg, rows, context = torch.arange(b, device=z0.device), slice(b, b + r), torch.cat([negative, row_context])
    wanted = list(dict.fromkeys([*names, *summed]))
    mask = row_mask[:, None].float()
    total = torch.zeros(b, 1, *z0.shape[-2:], device=z0.device).index_add_(0, row_image, mask)
    total = torch.where(total > 0, total, torch.ones_like(total))
    x, saved = z0.float(), {}
    for i, ((t, t_next), eta) in enumerate(zip(steps[: max(save_steps) + 1], etas)):
        xr = x[row_image]
        inp = (xr if negative is None else torch.cat([x, xr])).to(z0.dtype)
        # the same call at every step (one compiled graph, CUDA-graph friendly); t as a tensor
        out, feats = unet.forward_with_features(inp, torch.full(inp.shape[:1], t, device=inp.device), context, wanted, procs)
        if i in save_steps:  # indexing copies: safe against a CUDA graph's next replay
            saved[i] = {n: feats[n][neg] for n in names}
            saved[i].update({n: feats[n][neg].index_add_(0, row_image, feats[n][rows]) for n in summed})
        e_neg = out[neg][row_image].float()
        e = e_neg + guidance_scale * (out[rows].float() - e_neg)
        if schedule.prediction_type == "v_prediction":
            e = eps_from_v(xr, e, torch.full((r,), t, device=x.device), schedule)
        noise = torch.randn(xr.shape, generator=generator, device=x.device) if eta else torch.zeros_like(xr)
        xr = ddim_eta_step(xr, e, t, t_next, schedule, eta, noise)
        x = torch.zeros_like(x).index_add_(0, row_image, mask * xr) / total
    return {n: torch.stack([saved[i][n] for i in save_steps], 1) for n in wanted}
