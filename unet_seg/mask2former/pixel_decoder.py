"""Mask2Former's pixel decoder: a 6-layer multi-scale deformable-attention encoder over the three
coarsest backbone levels, then one FPN step to stride 4 (facebookresearch/Mask2Former
`MSDeformAttnPixelDecoder`; mmdet's port is the one QueryDiff's config names, same structure).

    features: 4 maps [B, C_i, H/s, W/s], s = 4, 8, 16, 32
    x_l      = GN(Conv1×1(f_l)),  pos_l = sine_l + level_embed_l          l over strides 32, 16, 8
    x        = 6 × [LN(x + MSDeformAttn(x + pos, ref, x)); LN(x + FFN(x))]  all levels at once
    y_4      = ReLU(GN(Conv3×3(GN(Conv1×1(f_4)) + up(x_8))))
    -> mask features Conv1×1(y_4) [B, mask_dim, H/4, W/4], memories x at strides 32, 16, 8 [B, dim, ·, ·]

The encoder runs in float32 with autocast off, as the reference does (its CUDA kernel has no
half precision; here it keeps the sampling locations exact at bf16 as well).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deform import MSDeformAttn, reference_points


def sine_position_embedding(h: int, w: int, num_feats: int = 128, temperature: float = 10000.0, device=None) -> Tensor:
    """DETR's normalised 2-D sine encoding (Mask2Former `PositionEmbeddingSine(normalize=True)`):
    [2·num_feats, h, w], channels (y then x) interleave sin and cos of
    (j + 1)/(h + ε)·2π / T^(2⌊k/2⌋/num_feats) (no −½ shift)."""
    eps, scale = 1e-6, 2 * math.pi
    y = (torch.arange(1, h + 1, device=device, dtype=torch.float32) / (h + eps) * scale)[:, None].expand(h, w)
    x = (torch.arange(1, w + 1, device=device, dtype=torch.float32) / (w + eps) * scale)[None, :].expand(h, w)
    k = torch.arange(num_feats, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)

    def encode(c: Tensor) -> Tensor:
        c = c[..., None] / dim_t  # [h, w, num_feats]
        return torch.stack([c[..., 0::2].sin(), c[..., 1::2].cos()], dim=-1).flatten(2)

    return torch.cat([encode(y), encode(x)], dim=-1).permute(2, 0, 1)


def _c2_xavier(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class DeformableEncoderLayer(nn.Module):
    """Post-norm: x = LN(x + MSDeformAttn(x + pos)); x = LN(x + FFN(x)), FFN with ReLU."""

    def __init__(self, dim: int, levels: int, heads: int, points: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor, reference: Tensor, sizes: Sequence[tuple[int, int]]) -> Tensor:
        x = self.norm1(x + self.drop(self.attn(x + pos, reference, x, sizes)))
        return self.norm2(x + self.ffn(x))


class MSDeformAttnPixelDecoder(nn.Module):
    """in_channels: the 4 backbone levels (strides 4, 8, 16, 32). Defaults are Mask2Former's:
    256 channels, 6 encoder layers, 8 heads, 4 points, FFN 1024, GroupNorm(32), dropout 0.

    forward(features) -> (mask features [B, mask_dim, H/4, W/4], [memory at stride 32, 16, 8])
    """

    def __init__(self, in_channels: Sequence[int], dim: int = 256, mask_dim: int = 256, layers: int = 6, heads: int = 8,
                 points: int = 4, ffn: int = 1024, groups: int = 32, dropout: float = 0.0):  # fmt: skip
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"expected 4 backbone levels (strides 4, 8, 16, 32), got channels {list(in_channels)}")
        self.in_channels = tuple(in_channels)
        coarse = self.in_channels[:0:-1]  # strides 32, 16, 8: the encoder's levels, coarse first
        self.input_proj = nn.ModuleList([nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(groups, dim)) for c in coarse])
        self.level_embed = nn.Parameter(torch.empty(len(coarse), dim))
        self.layers = nn.ModuleList([DeformableEncoderLayer(dim, len(coarse), heads, points, ffn, dropout) for _ in range(layers)])
        self.lateral = nn.Sequential(nn.Conv2d(self.in_channels[0], dim, 1, bias=False), nn.GroupNorm(groups, dim))
        self.output = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.GroupNorm(groups, dim), nn.ReLU(inplace=True))
        self.mask_features = nn.Conv2d(dim, mask_dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.layers:
            layer.attn.reset_parameters()
        nn.init.normal_(self.level_embed)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        for conv in (self.lateral[0], self.output[0], self.mask_features):
            _c2_xavier(conv)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        if len(features) != 4 or any(f.ndim != 4 or f.shape[1] != c for f, c in zip(features, self.in_channels)):
            raise ValueError(f"features must be 4 maps [B, C, h, w] with C = {list(self.in_channels)}, got {[list(f.shape) for f in features]}")
        device = features[0].device
        with torch.autocast(device.type, enabled=False):
            coarse = [f.float() for f in features[:0:-1]]
            sizes = [tuple(f.shape[-2:]) for f in coarse]
            tokens = torch.cat([proj(f).flatten(2).transpose(1, 2) for proj, f in zip(self.input_proj, coarse)], dim=1)
            pos = torch.cat([sine_position_embedding(h, w, tokens.shape[-1] // 2, device=device).flatten(1).T + self.level_embed[i]
                             for i, (h, w) in enumerate(sizes)])  # fmt: skip
            reference = reference_points(sizes, device=device)[None]
            for layer in self.layers:
                tokens = layer(tokens, pos[None], reference, sizes)
            b = tokens.shape[0]
            memories = [t.transpose(1, 2).reshape(b, -1, h, w) for t, (h, w) in zip(tokens.split([h * w for h, w in sizes], dim=1), sizes)]
            fine = self.lateral(features[0].float())
            fine = fine + F.interpolate(memories[-1], size=fine.shape[-2:], mode="bilinear", align_corners=False)
            return self.mask_features(self.output(fine)), memories
