"""QueryDiff's modules as the official code builds them (FanLiHub/QueryDiff), with the
smallest changes that make the released shapes compose (marked INFERRED; the release does not run as written).

    ProgressiveMerge        agent queries from Rein's per-layer tokens, 24 -> 12 -> 6 -> 3 layer groups, mean, MLP
    DiffusionTokens         U-Net feature maps -> M = r diffusion tokens [B, r, c] (INFERRED: not in the release)
    DiffusionConsistency    the DCL as released: (L_dist, L_sup)
    QueryRefinement         pixels attend to the agent queries (no residual), 4 dilated depth-wise convs

The blog's reading (queries from image features; DCL over the spatial axis) is
`unet_seg.attention.AgentQueries`, `AgentRefinement` and `unet_seg.losses.diffusion_consistency_loss`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def merge_schedule(layers: int, stages: int = 3) -> list[int]:
    """Layer groups after each merge stage, halving: 24 -> [12, 6, 3] (the release's L_list)."""
    out = []
    for _ in range(stages):
        layers = max(1, math.ceil(layers / 2))
        out.append(layers)
    return out


class StageGrouper(nn.Module):
    """One merge stage: each of the L_in layers' token sets [r, c] is one token of length r·c;
    L_out learnable group tokens attend to them (Q = groups, K = V = Linear(r·c -> e)), LN,
    Linear(e -> r·c): [L_in, r, c] -> [L_out, r, c]. No residual, no FFN (as released)."""

    def __init__(self, tokens: int, dim: int, layers_in: int, layers_out: int, embed_dim: int = 512, heads: int = 8):
        super().__init__()
        self.layers_in = layers_in
        self.proj_in = nn.Linear(tokens * dim, embed_dim)
        self.group_tokens = nn.Parameter(torch.randn(layers_out, embed_dim))
        self.attn = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(embed_dim)
        self.proj_out = nn.Linear(embed_dim, tokens * dim)

    def forward(self, q: Tensor) -> Tensor:
        x = self.proj_in(q.reshape(1, q.shape[0], -1))
        out = self.norm(self.attn(self.group_tokens[None], x, x, need_weights=False)[0])
        return self.proj_out(out).reshape(-1, *q.shape[1:])


class ProgressiveMerge(nn.Module):
    """QueryDiff's agent queries (release: `HierarchicalQueryEncoder`, attribute `PMerge`):
    Rein's tokens [L, r, c] (image-independent) -> q_agent [r, c].

        Q_0 = tokens;  Q_k = StageGrouper_k(Q_{k-1}), L -> ⌈L/2⌉ three times (24 -> 12 -> 6 -> 3)
        q_agent = MLP(mean over the groups of Q_3),  MLP = LN, Linear(c, 4c), GELU, Linear(4c, c)

    Release constants: embed 512, 8 heads, dropout 0; about 315 M parameters at r = 100, c = 1024.
    """

    def __init__(self, layers: int, tokens: int, dim: int, embed_dim: int = 512, heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        sizes = [layers] + merge_schedule(layers)
        self.stages = nn.ModuleList([StageGrouper(tokens, dim, a, b, embed_dim, heads) for a, b in zip(sizes, sizes[1:])])
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.shape = (layers, tokens, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        if tuple(tokens.shape) != self.shape:
            raise ValueError(f"Rein tokens must be {list(self.shape)} (layers, tokens, dim), got {list(tokens.shape)}")
        q = tokens
        for stage in self.stages:
            q = stage(q)
        return self.mlp(q.mean(0))


def token_grid(tokens: int) -> tuple[int, int]:
    """The most square h × w = tokens grid (10 × 10 for r = 100)."""
    h = max(d for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0)
    return h, tokens // h


class DiffusionTokens(nn.Module):
    """U-Net feature maps -> diffusion tokens [B, M, dim] with M = `tokens` (INFERRED).

    The release's DCL takes F_w, F_s as [B, M, 1024] and only type-checks with M = r, but the
    step from its tapped maps (1280/640/320 channels) to such tokens is not in the code. Here:
    each map is average-pooled to the `token_grid(tokens)` grid, projected to `dim` by a FROZEN
    random Gaussian matrix (seeded buffer, not saved; variance 1/C: training cannot move the KL target),
    and the maps are averaged. Weak and strong features use the same projection.
    """

    def __init__(self, channels: Sequence[int], dim: int, tokens: int, seed: int = 0):
        super().__init__()
        self.grid = token_grid(tokens)
        g = torch.Generator().manual_seed(seed)
        for i, c in enumerate(channels):
            self.register_buffer(f"proj_{i}", torch.randn(c, dim, generator=g, device=g.device) / math.sqrt(c), persistent=False)  # rebuilt from the seed
        self.count = len(channels)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        if len(maps) != self.count:
            raise ValueError(f"expected {self.count} feature maps, got {len(maps)}")
        pooled = [F.adaptive_avg_pool2d(m.float(), self.grid).flatten(2).transpose(1, 2) for m in maps]  # [B, M, C_i]
        return sum(p @ getattr(self, f"proj_{i}") for i, p in enumerate(pooled)) / self.count


class DiffusionConsistency(nn.Module):
    """QueryDiff's DCL as released (`DinoVisionTransformer.forward`): queries q [B, N, C], weak
    and strong diffusion tokens F_w, F_s [B, M, C] with M = N -> (L_dist, L_sup).

        S      = softmax_M(mlp_feat(q) · mlp_diff_w(F_w)ᵀ / √C)          [B, N, M]
        L_dist = KL(softmax_C(sg F_s) ‖ softmax_C(mlp_diff_new(S q)))    over channels, summed, / B
        L_sup  = SmoothL1_β=1(q, sg(S F_w))                               mean over elements

    Each mlp is ONE Linear (bias, no activation). As released `mlp_feat` is Linear(256, 1024) but
    q must be C-wide for `S q` and the Huber term: here it is Linear(C, C) (INFERRED). The release
    freezes these layers by accident (`set_requires_grad(["reins"])`); here they train.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.mlp_feat = nn.Linear(dim, dim)
        self.mlp_diff_w = nn.Linear(dim, dim)
        self.mlp_diff_new = nn.Linear(dim, dim)

    def forward(self, q: Tensor, weak: Tensor, strong: Tensor) -> tuple[Tensor, Tensor]:
        c = self.mlp_feat.in_features
        if q.ndim != 3 or q.shape[-1] != c or weak.shape != q.shape or strong.shape != q.shape:
            raise ValueError(f"q, weak and strong must all be [B, N, {c}] (M = N as released), got "
                             f"{list(q.shape)}, {list(weak.shape)}, {list(strong.shape)}")  # fmt: skip
        q, weak, strong = q.float(), weak.float(), strong.float()
        s = (self.mlp_feat(q) @ self.mlp_diff_w(weak).transpose(1, 2) / math.sqrt(c)).softmax(-1)
        rebuilt = self.mlp_diff_new(s @ q)
        l_dist = F.kl_div(rebuilt.log_softmax(-1), strong.detach().softmax(-1), reduction="batchmean")
        l_sup = F.smooth_l1_loss(q, (s @ weak).detach())
        return l_dist, l_sup


def _separable(channels: int, out: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, groups=channels, bias=False),
        nn.Conv2d(channels, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
    )  # fmt: skip


class QueryRefinement(nn.Module):
    """The release's `RefineMask2FormerHead` refinement of the pixel decoder's outputs by the agent
    queries q [B, r, d]: mask features [B, d, H/4, W/4] and 3 memories -> the same shapes.

        F'_l = MHA(Q = pixels of F_l, K = V = Linear(q))     each of the 4 maps, one shared MHA, NO residual
        X    = concat_l up(F'_l) at stride 4                   [B, 4d, H/4, W/4]
        G_k  = ReLU(BN(Conv1×1(DWConv3×3_dilation k(X))))      k = 1, 2, 3, 4
        mask features <- G_1;  memory_l <- G_{l+2} resized down to memory_l's size
    """

    def __init__(self, dim: int = 256, heads: int = 8):
        super().__init__()
        self.query_proj = nn.Linear(dim, dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fuse_convs = nn.ModuleList([_separable(4 * dim, dim, k) for k in (1, 2, 3, 4)])

    def forward(self, mask_features: Tensor, memories: Sequence[Tensor], q: Tensor) -> tuple[Tensor, list[Tensor]]:
        if len(memories) != 3:
            raise ValueError(f"expected 3 memories (strides 32, 16, 8), got {len(memories)}")
        kv = self.query_proj(q)
        size = mask_features.shape[-2:]
        refined = []
        for f in (mask_features, *memories):
            b, c, h, w = f.shape
            out = self.cross_attn(f.flatten(2).transpose(1, 2), kv, kv, need_weights=False)[0]
            out = out.transpose(1, 2).reshape(b, c, h, w)
            refined.append(out if (h, w) == size else F.interpolate(out, size=size, mode="bilinear", align_corners=False))
        x = torch.cat(refined, dim=1)
        fused = [conv(x) for conv in self.fuse_convs]
        down = [F.interpolate(g, size=m.shape[-2:], mode="bilinear", align_corners=False) for g, m in zip(fused[1:], memories)]
        return fused[0], down
