"""The Stable Diffusion 1.x / 2.x U-Net.

    unet(x, t, context) -> prediction        x [B, C_in, h, w], t [B] or scalar, context [B, L, D]
    unet.features(x, t, context, names)      -> {name: tensor}, stops after the deepest name asked for

Latents of any size h × w are taken, as diffusers' UNet2DConditionModel takes them: each
downsampler halves a side rounding up (h -> ⌈h/2⌉), and each upsampler goes back to the size
of the skip connection it meets, so an odd side comes back odd (BDD100K's 1280×720 -> 160×90
latents: 80×45, 40×23, 20×12 and back). Level i works at ⌈h/2^i⌉ × ⌈w/2^i⌉.

x and context may come in any float dtype: they are cast to the parameters' dtype and the
prediction returns in x's (the dtype rule of `unet_seg.models`); features stay in the compute dtype.

Hook points for primitives (nothing else in the model knows about them):

- `procs={attention name: proc}` replaces the attention product of chosen layers for one call
  (see `layers.Attention`); `unet.attention_names` lists the names, e.g. `down.1.attn.0.self`,
  `mid.attn.0.cross`, `up.3.attn.2.self`.
- `add_support_conv_in(C)` + `support=` rows: a second input convolution for some rows of the
  batch (DiffewS' supports: image + mask latents), the pretrained conv_in for the others.
- `features(...)` returns named block outputs: `conv_in`, `down.0`…`down.3` (after the
  level's downsampler), `mid`, `up.0`…`up.3` (after the level's upsampler), exactly the
  tensors diffusers' blocks return. For SD at 512² (64² latents):

        conv_in [320, 64, 64]   down.0 [320, 32, 32]   down.1 [640, 16, 16]   down.2 [1280, 8, 8]
        down.3 [1280, 8, 8]     mid [1280, 8, 8]       up.0 [1280, 16, 16]    up.1 [1280, 32, 32]
        up.2 [640, 64, 64]      up.3 [320, 64, 64]

    and the decoder's layers: `up.i.res.j`, the output of ResNet j (0..layers_per_block) of up
    level i, before its attention and the level's upsampler (diffusers' `up_blocks[i].resnets[j]`):
    up.0.res.* [1280, 8, 8], up.1.res.* [1280, 16, 16], up.2.res.* [640, 32, 32], up.3.res.* [320, 64, 64];
    `up.i.res.j.branch`, that ResNet's residual branch (conv2's output, before the shortcut is
    added); `up.i.attn.j` (levels with attention, i ≥ 1), the output of the transformer block in
    attention j (`up_blocks[i].attentions[j].transformer_blocks[0]`, before proj_out and the
    residual) as [B, C, h, w]. The last two are DIFF's official "resnet" and "ca" features.
    `unet.feature_info(name)` -> (channels, stride): a feature's width and how many latent pixels
    one of its pixels spans, from the config alone (no forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Attention, Downsample, Procs, ResBlock, SpatialTransformer, TimestepEmbedding, Upsample, timestep_embedding


class FeatureInfo(NamedTuple):
    """A named feature's width and stride: [B, channels, h / stride, w / stride] for latents [B, 4, h, w]."""

    channels: int
    stride: int


class FeatureTaps:
    """The named features one call asks for: `taps(name, tensor)` keeps a requested one and
    answers True once all of them are in, which is the network's one early exit."""

    def __init__(self, names: tuple[str, ...], stop_early: bool = True):
        self.names, self.stop_early, self.feats = names, stop_early, {}

    def __call__(self, name: str, h: Tensor) -> bool:
        if name in self.names:
            self.feats[name] = h
        return self.stop_early and bool(self.names) and len(self.feats) == len(self.names)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of an SD U-Net. `heads[i]` is the number of attention heads at level i
    (diffusers calls this `attention_head_dim` in SD1 configs; SD2 uses 64-wide heads).
    `upcast_attention` (SD 2.x-768) is kept for the checkpoint's config only: it guarded the
    fp16 softmax of unfused attention, and SDPA's fused kernels accumulate in float32 anyway."""

    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention: tuple[bool, ...] = (True, True, True, False)
    heads: tuple[int, ...] = (8, 8, 8, 8)
    layers_per_block: int = 2
    context_dim: int = 768
    linear_proj: bool = False
    upcast_attention: bool = False
    norm_groups: int = 32
    norm_eps: float = 1e-5
    support_in_channels: int = 0  # > 0: a second input convolution for support rows (`add_support_conv_in`)

    def __post_init__(self):
        n = len(self.channels)
        if not (len(self.attention) == len(self.heads) == n):
            raise ValueError(f"channels, attention and heads need one entry per level, got {self}")


SD15 = UNetConfig()
SD21 = UNetConfig(heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True, upcast_attention=True)
SD21_BASE = replace(SD21, upcast_attention=False)
# Same structure as SD1 / SD2 (four levels, attention on the first three; SD1: 8 heads per level,
# SD2: 64-wide heads), a few hundred times smaller.
TINY_SD1 = UNetConfig(channels=(32, 64, 64, 64), heads=(8, 8, 8, 8), context_dim=32)
TINY_SD2 = UNetConfig(
    channels=(64, 128, 128, 128), heads=(1, 2, 2, 2), context_dim=48, linear_proj=True, upcast_attention=True
)


class DownBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, level: int, c_in: int, c_out: int, temb_dim: int, last: bool):
        super().__init__()
        n, g, eps = cfg.layers_per_block, cfg.norm_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResBlock(c_in if j == 0 else c_out, c_out, temb_dim, g, eps) for j in range(n)])
        self.attentions = nn.ModuleList(
            [
                SpatialTransformer(
                    c_out, cfg.heads[level], cfg.context_dim, cfg.linear_proj,
                    f"down.{level}.attn.{j}", g,
                )
                for j in range(n if cfg.attention[level] else 0)
            ]
        )
        self.downsamplers = nn.ModuleList([] if last else [Downsample(c_out)])

    def forward(self, h: Tensor, temb: Tensor, context: Tensor, procs: Procs) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if len(self.attentions):
                h = self.attentions[j](h, context, procs)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, c: int, temb_dim: int):
        super().__init__()
        g, eps = cfg.norm_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResBlock(c, c, temb_dim, g, eps), ResBlock(c, c, temb_dim, g, eps)])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(c, cfg.heads[-1], cfg.context_dim, cfg.linear_proj, "mid.attn.0", g)]
        )

    def forward(self, h: Tensor, temb: Tensor, context: Tensor, procs: Procs) -> Tensor:
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context, procs)
        return self.resnets[1](h, temb)


class UpBlock(nn.Module):
    """Up level i (0 = deepest); each resnet takes the concatenation with one skip from the down path."""

    def __init__(self, cfg: UNetConfig, i: int, temb_dim: int):
        super().__init__()
        rev = cfg.channels[::-1]
        n, g, eps = cfg.layers_per_block, cfg.norm_groups, cfg.norm_eps
        level = len(rev) - 1 - i
        # resnet j concatenates h with one skip popped off the down path: h is c_prev wide (the
        # level below) for j = 0 and c_out after; skips j < n are the mirrored down level's own
        # outputs (c_out), skip n the output of the down level above it (its downsampler's, or
        # conv_in's for the top level: c_skip_in), as in diffusers' UpBlock2D
        c_prev, c_out, c_skip_in = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, len(rev) - 1)]
        self.resnets = nn.ModuleList(
            [
                ResBlock((c_prev if j == 0 else c_out) + (c_skip_in if j == n else c_out), c_out, temb_dim, g, eps)
                for j in range(n + 1)
            ]
        )
        self.attentions = nn.ModuleList(
            [
                SpatialTransformer(
                    c_out, cfg.heads[level], cfg.context_dim, cfg.linear_proj,
                    f"up.{i}.attn.{j}", g,
                )
                for j in range(n + 1 if cfg.attention[level] else 0)
            ]
        )
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if i < len(rev) - 1 else [])

    def forward(
        self, h: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor, procs: Procs, taps: FeatureTaps, prefix: str,
        up_size: Optional[tuple[int, int]] = None,
    ) -> tuple[Tensor, bool]:
        """-> (output, stopped): `taps` sees `<prefix>res.j.branch`, `res.j` and `attn.j` in that
        order; once it has all it asks for, the block stops there. `up_size`: the upsampler's
        output size, that of the next up level's first skip (diffusers' `upsample_size`)."""
        for j, resnet in enumerate(self.resnets):
            h, branch = resnet.parts(torch.cat([h, skips.pop()], dim=1), temb)
            if taps(f"{prefix}res.{j}.branch", branch) | taps(f"{prefix}res.{j}", h):
                return h, True
            if len(self.attentions):
                h, block = self.attentions[j].parts(h, context, procs)
                if taps(f"{prefix}attn.{j}", block):
                    return h, True
        for up in self.upsamplers:
            h = up(h, up_size)
        return h, False


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = SD15):
        super().__init__()
        self.config = cfg
        c0, n = cfg.channels[0], len(cfg.channels)
        temb_dim = 4 * c0
        self.time_embedding = TimestepEmbedding(c0, temb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)
        self.conv_in_support: Optional[nn.Conv2d] = None  # add_support_conv_in
        if cfg.support_in_channels:
            self.conv_in_support = nn.Conv2d(cfg.support_in_channels, c0, 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(cfg, i, cfg.channels[max(i - 1, 0)], cfg.channels[i], temb_dim, last=i == n - 1)
                for i in range(n)
            ]
        )
        self.mid_block = MidBlock(cfg, cfg.channels[-1], temb_dim)
        self.up_blocks = nn.ModuleList([UpBlock(cfg, i, temb_dim) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, c0, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c0, cfg.out_channels, 3, padding=1)
        self.feature_names = (
            ("conv_in",) + tuple(f"down.{i}" for i in range(n)) + ("mid",) + tuple(f"up.{i}" for i in range(n))
            + tuple(f"up.{i}.res.{j}" for i in range(n) for j in range(cfg.layers_per_block + 1))
            + tuple(f"up.{i}.res.{j}.branch" for i in range(n) for j in range(cfg.layers_per_block + 1))
            + tuple(f"up.{i}.attn.{j}" for i, b in enumerate(self.up_blocks) for j in range(len(b.attentions)))
        )  # fmt: skip
        self.attention_names = tuple(
m.name for m in self.modules() if isinstance(m, Attention))

    def feature_info(self, name: str) -> FeatureInfo:
        """(channels, stride relative to the latent) of `name` in `feature_names`, e.g. for SD:
        "up.1" -> (1280, 2), "up.2.res.0" -> (640, 2): for latents [B, 4, h, w] the feature is
        [B, channels, ⌈h / stride⌉, ⌈w / stride⌉]; multiply the stride by the VAE's 8 for the image's. Up levels run coarse to fine: "up.i" is level n − 1 − i after its upsampler."""
        if name not in self.feature_names:
            raise ValueError(f"unknown feature name {name!r}; choose from {self.feature_names}")
        ch, n = self.config.channels, len(self.config.channels)
        parts = name.split(".")
        if name == "conv_in":
            return FeatureInfo(ch[0], 1)
        if name == "mid":
            return FeatureInfo(ch[-1], 2 ** (n - 1))
        i = int(parts[1])
        if parts[0] == "down":  # after the level's downsampler (none on the last level)
            return FeatureInfo(ch[i], 2 ** min(i + 1, n - 1))
        level = n - 1 - i  # up.i works at the resolution of down level n − 1 − i
        if len(parts) == 2:  # after the upsampler (none on the last up level)
            return FeatureInfo(ch[level], 2 ** max(level - 1, 0))
        return FeatureInfo(ch[level], 2**level)

    def forward(
        self, x: Tensor, t: Union[Tensor, int, float], context: Tensor, procs: Procs = None, support: Optional[Tensor] = None
    ) -> Tensor:
        """x [B, C_in, h, w], t scalar or [B], context [B, L, context_dim] -> [B, C_out, h, w].
        support: bool [B], rows that enter through `conv_in_support` (see `add_support_conv_in`);
        then x is [B, C_support, h, w] and the other rows use conv_in on their first C_in channels."""
        return self._run(x, t, context, procs, (), support)[0]

    def features(
        self, x: Tensor, t: Union[Tensor, int, float], context: Tensor, names: Sequence[str], procs: Procs = None,
        support: Optional[Tensor] = None,
    ) -> dict[str, Tensor]:
        """Named block and decoder-layer outputs (see module docstring); the network stops after the deepest one."""
        unknown = [n for n in names if n not in self.feature_names]
        if unknown or not names:
            raise ValueError(f"unknown feature names {unknown or '(none given)'}; choose from {self.feature_names}")
        return self._run(x, t, context, procs, tuple(names), support)[1]

    def forward_with_features(
        self, x: Tensor, t: Union[Tensor, int, float], context: Tensor, names: Sequence[str], procs: Procs = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(prediction, named features) of one full pass: a sampler that also taps features."""
        unknown = [n for n in names if n not in self.feature_names]
        if unknown:
            raise ValueError(f"unknown feature names {unknown}; choose from {self.feature_names}")
        return self._run(x, t, context, procs, tuple(names), stop_early=False)

    def _run(
        self, x: Tensor, t: Union[Tensor, int, float], context: Tensor, procs: Procs, names: tuple[str, ...],
        support: Optional[Tensor] = None, stop_early: bool = True,
    ) -> tuple[Optional[Tensor], dict[str, Tensor]]:
        t = self._check_inputs(x, t, context, support)
        out_dtype, dtype = x.dtype, self.conv_in.weight.dtype  # the package's dtype rule (models/__init__.py)
        x, context = x.to(dtype), context.to(dtype)
        taps = FeatureTaps(names, stop_early)
        feats = taps.feats

        temb = self.time_embedding(timestep_embedding(t, self.config.channels[0]).to(dtype))
        if support is None:
            h = self.conv_in(x)
        else:  # both convolutions on every row, then a select: no data-dependent shapes
            plain = self.conv_in(x[:, : self.config.in_channels])
            h = torch.where(support.view(-1, 1, 1, 1), self.conv_in_support(x), plain)
        if taps("conv_in", h):
            return None, feats
        skips = [h]
        for i, block in enumerate(self.down_blocks):
            h, block_skips = block(h, temb, context, procs)
            skips.extend(block_skips)
            if taps(f"down.{i}", h):
                return None, feats
        h = self.mid_block(h, temb, context, procs)
        if taps("mid", h):
            return None, feats
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            # the skips decide the upsampling: an odd side s went down to (s + 1) / 2 and comes back to s
            up_size = tuple(skips[-n - 1].shape[-2:]) if len(skips) > n else None
            h, stopped = block(h, skips[-n:], temb, context, procs, taps, f"up.{i}.", up_size)
            if stopped:
                return None, feats
            del skips[-n:]
            if taps(f"up.{i}", h):
                return None, feats
        return self.conv_out(F.silu(self.conv_norm_out(h))).to(out_dtype), feats

    def _check_inputs(self, x: Tensor, t: Union[Tensor, int, float], context: Tensor, support: Optional[Tensor]) -> Tensor:
        cfg = self.config
        c_in = cfg.in_channels
        if support is not None:
            if self.conv_in_support is None:
                raise ValueError("support rows given but the U-Net has no conv_in_support: call add_support_conv_in first")
            if not isinstance(support, Tensor) or support.dtype != torch.bool or support.shape != x.shape[:1]:
                raise ValueError(f"support must be a bool tensor [B={x.shape[0]}], got {getattr(support, 'shape', support)}")
            c_in = self.conv_in_support.in_channels
        if x.ndim != 4 or x.shape[1] != c_in:
            raise ValueError(f"x must be [B, {c_in}, h, w] latents, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        b = x.shape[0]
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be [{b}, L, {cfg.context_dim}], got shape {tuple(context.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape [{b}], got shape {tuple(t.shape)}")
        return t

    @torch.no_grad()
    def widen_conv_in(self, in_channels: int) -> "UNet":
        """Accept `in_channels` = k × current input channels (e.g. image and mask latents
        concatenated, k = 2): conv_in's weight is tiled k times and divided by k, so that k equal
        copies of the old input give the old output (Marigold's initialisation). In place."""
        self.conv_in = _tiled(self.conv_in, in_channels)
        self.config = replace(self.config, in_channels=in_channels)
        return self

    @torch.no_grad()
    def add_support_conv_in(self, in_channels: int) -> "UNet":
        """Add a second input convolution, `conv_in_support` (in_channels -> C_0), for rows marked
        by forward's `support` (DiffewS: supports enter as [image latent; mask latent], 8 channels,
        through it; queries keep the pretrained conv_in with their image latent only). Initialised
        as the official DiffewS checkpoint's `conv_in_ref`: conv_in's weight tiled k = in_channels /
        C_in times and divided by k, bias copied, so [z_1; z_2] gives (conv_in(z_1) + conv_in(z_2)) / 2.
        conv_in itself is untouched. In place."""
        self.conv_in_support = _tiled(self.conv_in, in_channels)
        self.config = replace(self.config, support_in_channels=in_channels)
        return self


def _tiled(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of `conv` taking in_channels = k × its input channels: weight tiled k times and
    divided by k, bias copied."""
    k, rem = divmod(in_channels, conv.in_channels)
    if rem or k < 1:
        raise ValueError(f"in_channels must be a multiple of {conv.in_channels}, got {in_channels}")
    new = nn.Conv2d(in_channels, conv.out_channels, 3, padding=1, device=conv.weight.device, dtype=conv.weight.dtype)
    new.weight.copy_(conv.weight.repeat(1, k, 1, 1) / k)
    new.bias.copy_(conv.bias)
    return new
