"""Trainable heads over frozen diffusion features (DIFF): the convolutional fusion block and
DAFormer's decode head.

    fusion = DiffusionFeatureFusion(in_channels=(c8, c16, c32), dims=(512, 1024, 2048), fine_dim=256)
    head = DAFormerHead(fusion.out_channels, num_classes=19)   # dilations for 512² training crops
    logits = head(fusion([f8, f16, f32]))          # [B, 19, H/4, W/4]
    small = DAFormerHead(fusion.out_channels, 19, dilations=scaled_dilations(64 // 4))  # 64² crops: (1, 2, 2, 2)

Both take their levels in one order, **fine to coarse** (level i + 1 half the size of level i),
as timm's and mmseg's feature pyramids list them, and as `UNet.feature_info` reports up levels.

`DiffusionFeatureFusion` is DIFF's F_conv (eq. 1): per stride, the concatenation of all tapped
layers over all timesteps (and the cross-attention maps) goes through a GroupNorm bottleneck
ResNet block to `dims[i]` channels; then a top-down path of stride-2 transposed convolutions and
residual blocks adds each finer level and ends one octave below the finest, so that the head
gets four levels (strides 4, 8, 16, 32 of the image for SD's up.3/up.2/up.1 layers at 512²).
Sizes and norms follow the official code (Yux1angJi/DIFF `direct_aggregation` + `finecoder`).

`DAFormerHead` is DAFormer's context-aware fusion head (Hoyer et al., CVPR 2022, its `sepaspp`
variant): a 1×1 embedding of every level to `embed_dim`, bilinear upsampling to the finest level,
concatenation, a depthwise-separable ASPP (dilations 1, 6, 12, 18, no image pooling), a 3×3
bottleneck, dropout 0.1 and a 1×1 classifier. Those dilations are in pixels of the finest level
and were set for DAFormer's training maps: stride 4 of 512² crops, 128² (the largest reaches 72
image pixels). On smaller training maps the largest ones read nothing but padding (dilation ≥
the map's side), so training refuses them; `scaled_dilations(crop // stride)` scales them to the
same fraction of the crop. Evaluation keeps the trained dilations at any image size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_levels(feats: Sequence[Tensor], channels: Sequence[int], what: str) -> None:
    got = [tuple(f.shape) for f in feats]
    if len(feats) != len(channels) or any(f.ndim != 4 or f.shape[1] != c for f, c in zip(feats, channels)):
        raise ValueError(f"{what} expects {len(channels)} maps [B, C, h, w] with C = {list(channels)}, got {got}")


class Bottleneck(nn.Module):
    """ResNet bottleneck (1×1 → 3×3 → 1×1, width c_out/4) with GroupNorm and a 1×1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        mid = c_out // 4
        self.body = nn.Sequential(
            nn.Conv2d(c_in, mid, 1, bias=False), nn.GroupNorm(groups, mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.GroupNorm(groups, mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, c_out, 1, bias=False), nn.GroupNorm(groups, c_out),
        )  # fmt: skip
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(groups, c_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class UpFuse(nn.Module):
    """×2 transposed convolution, plus the finer level if given, then a residual block (two 3×3 + GN).
    Where the finer level has an odd side (2n − 1, the U-Net's skip sizes at odd latents), the
    2n-wide upsampled map is cut to it (its last row or column dropped)."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
        self.res = nn.Sequential(
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out),
        )  # fmt: skip

    def forward(self, x: Tensor, finer: Tensor | None = None) -> Tensor:
        x = self.up(x)
        if finer is not None:
            x = x[..., : finer.shape[-2], : finer.shape[-1]] + finer
        return F.relu(x + self.res(x))


class DiffusionFeatureFusion(nn.Module):
    """DIFF's fusion block F_conv. Input: per level, fine to coarse (each level half the size of
    the previous, rounded up: the U-Net's levels), the channel concatenation of its layers × timesteps [B, in_channels[i], h_i, w_i];
    `dims[i]`: level i's width after its bottleneck. Output, fine to coarse: [fused [B, fine_dim,
    2·h_0, 2·w_0], then each level's normalised projection [B, dims[i], h_i, w_i]]."""

    def __init__(
        self,
        in_channels: Sequence[int],
        dims: Sequence[int] = (2048, 1024, 512),
        fine_dim: int = 256,
        bottleneck_groups: int = 16,
        groups: int = 32,
    ):
        super().__init__()
        if len(in_channels) != len(dims) or len(dims) < 1:
            raise ValueError(f"in_channels and dims need one entry per level, got {list(in_channels)} and {list(dims)}")
        self.in_channels, self.dims = tuple(in_channels), tuple(dims)
        # built and initialised coarse first (the official order of random draws), kept fine first
        c_in, c_out = in_channels[::-1], dims[::-1]
        project = [Bottleneck(c, d, bottleneck_groups) for c, d in zip(c_in, c_out)]
        norm = [nn.GroupNorm(groups, d) for d in c_out]
        up = [UpFuse(c, o, groups) for c, o in zip(c_out, [*c_out[1:], fine_dim])]
        for m in nn.ModuleList([*project, *norm, *up]).modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # fine first: up[i] takes level i to the size of level i − 1 (of the fused output for i = 0)
        self.project, self.norm, self.up = (nn.ModuleList(m[::-1]) for m in (project, norm, up))
        self.out_channels = (fine_dim, *dims)

    def forward(self, levels: Sequence[Tensor]) -> list[Tensor]:
        _check_levels(levels, self.in_channels, "DiffusionFeatureFusion")
        proj = [norm(p(x)) for x, p, norm in zip(levels, self.project, self.norm)]
        x = proj[-1]
        for i in reversed(range(len(proj))):  # top-down: from the coarsest, adding each finer level
            x = self.up[i](x, proj[i - 1] if i > 0 else None)
        return [x, *proj]


DAFORMER_DILATIONS = (1, 6, 12, 18)  # DAFormer's sepaspp ASPP ...
DAFORMER_MAP = 128  # ... for its finest level on a 512² training crop (stride 4)


def scaled_dilations(map_size: int, dilations: Sequence[int] = DAFORMER_DILATIONS, reference: int = DAFORMER_MAP) -> tuple[int, ...]:
    """`dilations` set for `reference`-pixel training maps, scaled to maps of `map_size` pixels (the
    finest level's shorter side on a training crop, crop // stride) so that each branch spans about
    the same fraction of the crop: round(d · map_size / reference), at least 2, and 1 (the 1×1 branch)
    stays 1, so the head's layers and parameters do not change. 512² crops at stride 4 keep
    (1, 6, 12, 18); stride 8 gives (1, 3, 6, 9); 64² crops at stride 4 give (1, 2, 2, 2)."""
    if map_size < 1 or reference < 1 or any(d < 1 for d in dilations):
        raise ValueError(f"map_size {map_size}, reference {reference} and dilations {tuple(dilations)} must be >= 1")
    return tuple(1 if d == 1 else max(2, round(d * map_size / reference)) for d in dilations)


def _conv_bn_relu(c_in: int, c_out: int, k: int, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=pad, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DAFormerHead(nn.Module):
    """levels fine to coarse [B, in_channels[i], h_i, w_i] -> logits [B, num_classes, h_0, w_0].
    `dilations` are the ASPP branches', in pixels of level 0, for the maps it trains on (module doc)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        embed_dim: int = 256,
        dilations: Sequence[int] = DAFORMER_DILATIONS,
        dropout: float = 0.1,
    ):
        super().__init__()
        if not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"dilations must be one or more integers >= 1, got {tuple(dilations)}")
        self.in_channels, self.dilations = tuple(in_channels), tuple(dilations)
        self.embed = nn.ModuleList([nn.Conv2d(c, embed_dim, 1) for c in in_channels])
        c = embed_dim * len(in_channels)
        self.aspp = nn.ModuleList(
            [
                _conv_bn_relu(c, embed_dim, 1)
                if d == 1
                else nn.Sequential(_conv_bn_relu(c, c, 3, d, groups=c), _conv_bn_relu(c, embed_dim, 1))
                for d in dilations
            ]
        )
        self.bottleneck = _conv_bn_relu(embed_dim * len(dilations), embed_dim, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        _check_levels(levels, self.in_channels, "DAFormerHead")
        size = levels[0].shape[-2:]
        if self.training and max(self.dilations) >= min(size):
            raise ValueError(
                f"DAFormerHead: dilation {max(self.dilations)} >= the {size[0]}×{size[1]} finest level: that ASPP branch "
                f"reads only padding. Dilations {self.dilations} need training maps larger than {max(self.dilations)}² "
                f"(DAFormer's (1, 6, 12, 18) are for {DAFORMER_MAP}², stride 4 of 512² crops); scale them to "
                f"the crop, dilations=scaled_dilations(crop // stride), on maps of 3 pixels or more"
            )
        x = torch.cat(
            [F.interpolate(e(f), size=size, mode="bilinear", align_corners=False) for e, f in zip(self.embed, levels)],
            dim=1,
        )
        x = self.bottleneck(torch.cat([branch(x) for branch in self.aspp], dim=1))
        return self.classify(self.dropout(x))
