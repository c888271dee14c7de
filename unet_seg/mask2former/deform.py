"""Multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021), in pure PyTorch.

    out[b, q, m] = Σ_l Σ_p  A[b, q, m, l, p] · bilinear(V_l[b, :, :, m], loc[b, q, m, l, p])

`ms_deform_attn` is the sampling core with the semantics of Deformable DETR's reference
(`ms_deform_attn_core_pytorch`): one `grid_sample` per level, bilinear, zeros outside the map,
pixel centres at ((i + 0.5) / W, (j + 0.5) / H) (align_corners=False). `MSDeformAttn` is the
layer with its projections and Deformable DETR's initialisation. No CUDA extension: the levels'
sizes are Python ints, so the function compiles without graph breaks.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.layers import filled

Shapes = Union[Tensor, Sequence[Sequence[int]]]


def level_sizes(spatial_shapes: Shapes) -> list[tuple[int, int]]:
    """[L, 2] (H, W) as a long tensor or a sequence of pairs -> list of (H, W) Python ints.
    (A tensor is read on the host: pass pairs inside compiled code.)"""
    pairs = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes
    sizes = [(int(h), int(w)) for h, w in pairs]
    if not sizes or any(h < 1 or w < 1 for h, w in sizes):
        raise ValueError(f"spatial_shapes must be L >= 1 positive (H, W) pairs, got {sizes}")
    return sizes


def ms_deform_attn(value: Tensor, spatial_shapes: Shapes, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention sampling.

    value               [B, S, M, D]        the L levels flattened row-major and concatenated, S = Σ H_l·W_l
    spatial_shapes      [L, 2]              (H_l, W_l), long tensor or pairs of ints
    sampling_locations  [B, Q, M, L, P, 2]  normalised (x, y) in [0, 1] over each level's map
    attention_weights   [B, Q, M, L, P]
    -> [B, Q, M·D]; bilinear, zero outside each map; differentiable in the three tensors.
    """
    sizes = level_sizes(spatial_shapes)
    if value.ndim != 4:
        raise ValueError(f"value must be [B, S, M, D], got {list(value.shape)}")
    b, s, m, d = value.shape
    if s != sum(h * w for h, w in sizes):
        raise ValueError(f"value has S = {s} positions but spatial_shapes {sizes} give {sum(h * w for h, w in sizes)}")
    if sampling_locations.ndim != 6 or sampling_locations.shape[0] != b or sampling_locations.shape[2:4] != (m, len(sizes)) or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be [{b}, Q, {m}, {len(sizes)}, P, 2], got {list(sampling_locations.shape)}")
    q, p = sampling_locations.shape[1], sampling_locations.shape[4]
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights must be {list(sampling_locations.shape[:-1])}, got {list(attention_weights.shape)}")
    grids = 2 * sampling_locations.to(value.dtype) - 1
    sampled = []
    for level, (v, (h, w)) in enumerate(zip(value.split([h * w for h, w in sizes], dim=1), sizes)):
        v = v.permute(0, 2, 3, 1).reshape(b * m, d, h, w)  # one map per (batch, head)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(b * m, q, p, 2)
        sampled.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))  # [B·M, D, Q, P]
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(b * m, 1, q, len(sizes) * p)
    out = (torch.cat(sampled, dim=-1) * weights).sum(-1)  # [B·M, D, Q]
    return out.view(b, m * d, q).transpose(1, 2)


def reference_points(sizes: Sequence[tuple[int, int]], device=None, dtype=torch.float32) -> Tensor:
    """Pixel centres of every level, normalised: [Σ H_l·W_l, 2] (x, y) = ((i + ½)/W, (j + ½)/H)."""
    points = []
    for h, w in sizes:
        y = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        points.append(torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1).reshape(h * w, 2))
    return torch.cat(points)


class MSDeformAttn(nn.Module):
    """Deformable attention layer: query [B, Q, C], reference points [B or 1, Q, 2] in [0, 1],
    value tokens [B, S, C] over `sizes` -> [B, Q, C].

        loc_{m,l,p} = ref + Δ_{m,l,p}(query) / (W_l, H_l)        offsets in pixels of level l
        A_{m,·,·}  = softmax over (l, p) of Linear(query)
        out        = W_o · ms_deform_attn(W_v · value, sizes, loc, A)

    Init as Deformable DETR: zero offset weights, offset biases on a ring of 8 directions with
    radius p + 1 per point, zero attention logits (uniform weights), xavier value/output projections.
    """

    def __init__(self, dim: int = 256, levels: int = 3, heads: int = 8, points: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        ring = torch.stack([angle.cos(), angle.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True).values  # on the square of radius 1
        scale = torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = ring.view(self.heads, 1, 1, 2).expand(-1, self.levels, self.points, -1) * scale
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, reference: Tensor, value: Tensor, sizes: Sequence[tuple[int, int]]) -> Tensor:
        b, q, _ = query.shape
        m, l, p = self.heads, self.levels, self.points
        if len(sizes) != l:
            raise ValueError(f"expected {l} levels, got sizes {list(sizes)}")
        v = self.value_proj(value).view(b, value.shape[1], m, self.dim // m)
        offsets = self.sampling_offsets(query).view(b, q, m, l, p, 2)
        weights = self.attention_weights(query).view(b, q, m, l * p).softmax(-1).view(b, q, m, l, p)
        normaliser = filled([v for h, w in sizes for v in (w, h)], query).view(l, 2)  # [L, 2] as (x, y)
        loc = reference[:, :, None, None, None, :] + offsets / normaliser[:, None, :]
        return self.output_proj(ms_deform_attn(v, sizes, loc, weights))
