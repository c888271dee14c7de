"""Mask2Former's masked-attention transformer decoder (facebookresearch/Mask2Former
`MultiScaleMaskedTransformerDecoder`, post-norm as in its configs).

    queries q [B, Q, d] (content) and query positions p [B, Q, d], given by the caller
    memories m_0..m_2 [B, d, h_l, w_l] (strides 32, 16, 8), mask features F [B, d, H/4, W/4]
    (c, M)_0 = head(q)
    layer i (level l = i mod 3):
        q = LN(q + MaskedCrossAttn(q + p, m_l + pos_l + e_l, m_l + e_l; mask: σ(M_i) < ½ at m_l's size))
        q = LN(q + SelfAttn(q + p, q + p, q));   q = LN(q + FFN(q))
        (c, M)_{i+1} = head(q)
    head(q) = (Linear(LN(q)) [B, Q, K+1],  MLP₃(LN(q)) · F [B, Q, H/4, W/4])

A query whose mask covers nothing at that level attends everywhere (the reference's rule).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pixel_decoder import sine_position_embedding


class MaskedAttentionLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each followed by residual + LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.cross = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(3)])

    def forward(self, q: Tensor, pos: Tensor, memory: Tensor, memory_pos: Tensor, blocked: Tensor) -> Tensor:
        """blocked [B, Q, h·w] True where a query may not look."""
        mask = blocked.repeat_interleave(self.heads, dim=0)
        q = self.norms[0](q + self.cross(q + pos, memory + memory_pos, memory, attn_mask=mask, need_weights=False)[0])
        q = self.norms[1](q + self.self_attn(q + pos, q + pos, q, need_weights=False)[0])
        return self.norms[2](q + self.ffn(q))


class MaskedAttentionDecoder(nn.Module):
    """Defaults are Mask2Former's: d 256, 8 heads, 9 layers, FFN 2048, 3 levels.

    forward(mask_features, memories, queries, query_pos) -> (class logits per prediction
    [B, Q, K+1], mask logits per prediction [B, Q, H/4, W/4]): 1 + layers predictions, the
    first from the initial queries, all meant for deep supervision; the last is the output.
    """

    def __init__(self, num_classes: int, dim: int = 256, heads: int = 8, layers: int = 9, ffn: int = 2048, levels: int = 3,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.levels = levels
        self.level_embed = nn.Embedding(levels, dim)
        self.layers = nn.ModuleList([MaskedAttentionLayer(dim, heads, ffn, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, mask_features: Tensor, memories: Sequence[Tensor], queries: Tensor, query_pos: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        dim = self.norm.normalized_shape[0]
        if len(memories) != self.levels or any(m.ndim != 4 or m.shape[1] != dim for m in memories):
            raise ValueError(f"memories must be {self.levels} maps [B, {dim}, h, w], got {[list(m.shape) for m in memories]}")
        if queries.ndim != 3 or queries.shape[-1] != dim or query_pos.shape != queries.shape:
            raise ValueError(f"queries and query_pos must be [B, Q, {dim}], got {list(queries.shape)} and {list(query_pos.shape)}")
        tokens = [m.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, m in enumerate(memories)]
        token_pos = [sine_position_embedding(*m.shape[-2:], dim // 2, device=m.device).flatten(1).T.to(m.dtype) for m in memories]
        q = queries
        cls, masks, blocked = self._predict(q, mask_features, memories[0].shape[-2:])
        all_cls, all_masks = [cls], [masks]
        for i, layer in enumerate(self.layers):
            level = i % self.levels
            q = layer(q, query_pos, tokens[level], token_pos[level], blocked)
            cls, masks, blocked = self._predict(q, mask_features, memories[(i + 1) % self.levels].shape[-2:])
            all_cls.append(cls)
            all_masks.append(masks)
        return all_cls, all_masks

    def _predict(self, q: Tensor, mask_features: Tensor, size) -> tuple[Tensor, Tensor, Tensor]:
        qn = self.norm(q)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(qn), mask_features.to(qn.dtype))
        blocked = F.interpolate(masks.detach(), size=size, mode="bilinear", align_corners=False).flatten(2) < 0  # σ < ½
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
        return self.class_embed(qn), masks, blocked
