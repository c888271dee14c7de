"""Attention processors for the U-Net's hook (`proc(q, k, v, name) -> out`, see `models/layers.py`)
and QueryDiff's agent-query attention modules.

    procs, maps = attention_map_capture(names, latent_size)    # unet(x, t, ctx, procs=procs); maps filled
    procs = kv_fusion_procs(self_attention_layers(unet.attention_names), num_supports=S)
    procs = context_slice_procs(cross_attention_layers(names), start, stop)  # layers see tokens [start, stop)

Processors take q [B, heads, Lq, d], k/v [B, heads, Lk, d] and return [B, heads, Lq, d]. They
hold no state beyond the objects the caller builds for one call: nothing global, no module hooks.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.layers import Attention, AttnProc


def self_attention_layers(names: Iterable[str]) -> tuple[str, ...]:
    """The self-attention layers among `names` (e.g. `unet.attention_names`): those ending in `.self`."""
    return tuple(n for n in names if n.endswith(".self"))


def cross_attention_layers(names: Iterable[str]) -> tuple[str, ...]:
    """The text cross-attention layers among `names`: those ending in `.cross`."""
    return tuple(n for n in names if n.endswith(".cross"))


# ---------------------------------------------------------------------------------------------
# Attention-map capture (DIFF: cross-attention maps fused with the decoder features)


def attention_map_capture(
    names: Iterable[str], latent_size: tuple[int, int]
) -> tuple[dict[str, AttnProc], dict[str, Tensor]]:
    """Processors that also record each layer's head-averaged attention probabilities.

    Returns `(procs, maps)`. After `unet(..., procs=procs)` (or `unet.features`), `maps[name]` is
    mean_heads softmax(q kᵀ / √d), laid out as [B, Lk, h, w]: for cross-attention Lk is the
    number of text tokens and `maps[name][:, :, i, j]` sums to 1 over tokens. (h, w) is the
    layer's grid: `latent_size` (H, W) divided by the layer's downsampling factor s = 2^level,
    rounded up as the U-Net does, found from Lq = ⌈H/s⌉·⌈W/s⌉. The layer output is (probabilities) · v, equal to SDPA's. Build a fresh
    pair per call; `maps` is a plain dict owned by the caller.
    """
    lat_h, lat_w = latent_size
    if lat_h < 1 or lat_w < 1:
        raise ValueError(f"latent_size must be two positive ints (H, W), got {latent_size}")
    maps: dict[str, Tensor] = {}

    def capture(q: Tensor, k: Tensor, v: Tensor, name: str) -> Tensor:
        h, w = _layer_grid(q.shape[2], lat_h, lat_w, name)
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = scores.softmax(dim=-1, dtype=torch.float32)  # [B, heads, Lq, Lk]
        maps[name] = probs.mean(dim=1).transpose(1, 2).unflatten(2, (h, w)).to(q.dtype)
        return probs.to(v.dtype) @ v

    return {n: capture for n in names}, maps


def _layer_grid(seq_len: int, lat_h: int, lat_w: int, name: str) -> tuple[int, int]:
    """The layer's grid (⌈H/s⌉, ⌈W/s⌉) with s = 2^level and h·w = seq_len: the U-Net halves each
    side rounding up, so a 17×11 latent has 9×6, 5×3 and 3×2 grids below it."""
    h, w = lat_h, lat_w
    while h * w > seq_len and (h, w) != (1, 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != seq_len:
        raise ValueError(
            f"layer {name!r} has {seq_len} query tokens, which is no (H/s)·(W/s) grid for the "
            f"latent size {(lat_h, lat_w)} given to attention_map_capture"
        )
    return h, w


# ---------------------------------------------------------------------------------------------
# Per-layer text context (DiGSeg: class tokens at some scales, SD's empty prompt at the others)


def context_slice_procs(names: Iterable[str], start: int, stop: int) -> dict[str, AttnProc]:
    """Processors with which the cross-attention layers `names` attend to context tokens
    [start, stop) only: one U-Net call can then give different layers different contexts, laid
    end to end along the token axis (e.g. [empty prompt (77) ; class tokens (K)]).

    Each layer's output equals that of the same layer called with `context[:, start:stop]`;
    keys and values of the other tokens are computed and dropped (a few tokens against
    thousands of queries). Slicing is static, so compiled graphs stay whole.
    """
    if not 0 <= start < stop:
        raise ValueError(f"need 0 <= start < stop, got start={start}, stop={stop}")

    def sliced(q: Tensor, k: Tensor, v: Tensor, name: str) -> Tensor:
        if k.shape[2] < stop:
            raise ValueError(f"layer {name!r} got {k.shape[2]} context tokens, fewer than stop={stop}")
        return F.scaled_dot_product_attention(q, k[:, :, start:stop], v[:, :, start:stop])

    return {n: sliced for n in names}


# ---------------------------------------------------------------------------------------------
# KV fusion self-attention (DiffewS)


def kv_fusion_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_supports: int,
    support_mask: Optional[Tensor] = None,
    subsample: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """DiffewS' KV fusion self-attention (fig. 2d) over a grouped batch.

    Batch layout: B = G·(1+S) in G episodes of 1+S consecutive images,
    `[query_0, support_0_1 .. support_0_S, query_1, support_1_1, ...]` (S = `num_supports`).
    q, k, v [B, heads, L, d] -> [B, heads, L, d]. For each episode g:

        out_query   = softmax(Q_q [K_q; K_s1; ..; K_sS]ᵀ / √d) [V_q; V_s1; ..; V_sS]
        out_support = softmax(Q_s K_sᵀ / √d) V_s            (plain self-attention)

    support_mask: [G, S] bool, False marks a padding support (variable number of supports per
    episode): its tokens are masked out of the query's keys. All-False gives plain self-attention.
    subsample (N-shot inference trick, DiffewS appendix): keep L of the S·L valid support tokens,
    drawn uniformly without replacement per episode and per call, so the query attends to 2L
    keys as in 1-shot; a no-op for S <= 1. `generator=None` uses the global RNG, which
    torch.compile traces; a `torch.Generator` makes draws reproducible but breaks the graph there.
    """
    b, heads, length, d = q.shape
    if num_supports < 0:
        raise ValueError(f"num_supports must be >= 0, got {num_supports}")
    if num_supports == 0:
        return F.scaled_dot_product_attention(q, k, v)
    n = 1 + num_supports
    if b % n:
        raise ValueError(f"batch {b} is not a whole number of episodes of 1 query + {num_supports} supports")
    groups = b // n
    if k.shape[2] != length:
        raise ValueError(f"KV fusion needs self-attention (Lq == Lk), got Lq={length}, Lk={k.shape[2]}")
    q, k, v = (x.unflatten(0, (groups, n)) for x in (q, k, v))  # [G, 1+S, heads, L, d]

    support_out = F.scaled_dot_product_attention(q[:, 1:], k[:, 1:], v[:, 1:])  # [G, S, heads, L, d]

    k_sup = k[:, 1:].transpose(1, 2).flatten(2, 3)  # [G, heads, S·L, d]
    v_sup = v[:, 1:].transpose(1, 2).flatten(2, 3)
    valid = None
    if support_mask is not None:
        _check_support_mask(support_mask, num_supports)
        if support_mask.shape[0] != groups:
            raise ValueError(f"support_mask has {support_mask.shape[0]} episodes, the batch {b} has {groups}")
        valid = support_mask.to(q.device)[:, :, None].expand(groups, num_supports, length).flatten(1)  # [G, S·L]
    if subsample and num_supports > 1:
        scores = torch.rand(groups, num_supports * length, generator=generator, device=q.device)
        if valid is not None:
            scores = torch.where(valid, scores, -1.0)  # invalid tokens only fill up after all valid ones
        keep = scores.topk(length, dim=1).indices  # [G, L]
        index = keep[:, None, :, None].expand(groups, heads, length, d)
        k_sup, v_sup = k_sup.gather(2, index), v_sup.gather(2, index)
        valid = None if valid is None else valid.gather(1, keep)
    k_fused = torch.cat([k[:, 0], k_sup], dim=2)
    v_fused = torch.cat([v[:, 0], v_sup], dim=2)
    attn_mask = None
    if valid is not None:
        own = torch.ones(groups, length, dtype=torch.bool, device=q.device)
        attn_mask = torch.cat([own, valid], dim=1)[:, None, None, :]  # [G, 1, 1, L + S'·L]
    query_out = F.scaled_dot_product_attention(q[:, 0], k_fused, v_fused, attn_mask=attn_mask)

    return torch.cat([query_out[:, None], support_out], dim=1).flatten(0, 1)


def _check_support_mask(mask: Tensor, num_supports: int) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"support_mask must be a bool tensor [G, S], got {getattr(mask, 'dtype', type(mask))}")
    if mask.ndim != 2 or mask.shape[1] != num_supports:
        raise ValueError(f"support_mask must have shape [G, S={num_supports}], got {list(mask.shape)}")


def kv_fusion_procs(
    layers: Iterable[str],
    num_supports: int,
    support_mask: Optional[Tensor] = None,
    subsample: bool = False,
    generator: Optional[torch.Generator] = None,
) -> dict[str, AttnProc]:
    """`{layer: KV-fusion processor}` for the given self-attention layers (one episode layout for
    the whole call; see `kv_fusion_attention`). Typically
    `kv_fusion_procs(self_attention_layers(unet.attention_names), S)`."""
    layers = tuple(layers)
    cross = [n for n in layers if not n.endswith(".self")]
    if cross:
        raise ValueError(f"KV fusion applies to self-attention layers ('*.self'), got {cross}")
    if num_supports < 0:
        raise ValueError(f"num_supports must be >= 0, got {num_supports}")
    if support_mask is not None:
        _check_support_mask(support_mask, num_supports)

    def fused(q: Tensor, k: Tensor, v: Tensor, name: str) -> Tensor:
        return kv_fusion_attention(q, k, v, num_supports, support_mask, subsample, generator)

    return {n: fused for n in layers}


# ---------------------------------------------------------------------------------------------
# Agent-query attention (QueryDiff)


class AgentQueries(nn.Module):
    """QueryDiff's agent-query generation: learnable q_init aggregates each backbone stage, then
    the stage-wise queries are merged progressively (querydiff-blog, "Agent Queries Generation").

    stages: N feature maps f_l [B, C_l, h_l, w_l] (C_l = `stage_channels[l]`) -> q_agent [B, r, dim].

        q_l = Attn(Q = q_init, K = V = LN(f_l))                     stage-wise queries, [B, r, dim]
        m_1 = q_1;   m_l = q_l + Attn(Q = q_init, K = V = LN(m_{l-1}))    progressive merging
        q_agent = LN(m_N)

    Attn is multi-head attention with its own projections per use; q_init [r, dim] is shared by
    every stage and every merge, and is broadcast over the batch.
    """

    def __init__(self, stage_channels: Sequence[int], num_queries: int = 100, dim: int = 256, heads: int = 8):
        super().__init__()
        if not stage_channels:
            raise ValueError("stage_channels needs at least one backbone stage")
        self.q_init = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.stage_norms = nn.ModuleList([nn.LayerNorm(c) for c in stage_channels])
        self.stage_attns = nn.ModuleList(
            [Attention(dim, heads, c, qkv_bias=True, name=f"agent.stage.{i}") for i, c in enumerate(stage_channels)]
        )
        self.merge_norms = nn.ModuleList([nn.LayerNorm(dim) for _ in stage_channels[1:]])
        self.merge_attns = nn.ModuleList(
            [Attention(dim, heads, qkv_bias=True, name=f"agent.merge.{i}") for i in range(1, len(stage_channels))]
        )
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, stages: Sequence[Tensor]) -> Tensor:
        if len(stages) != len(self.stage_attns):
            raise ValueError(f"expected {len(self.stage_attns)} stage feature maps, got {len(stages)}")
        b = stages[0].shape[0]
        q_init = self.q_init.expand(b, -1, -1)
        merged = None
        for i, f in enumerate(stages):
            c = self.stage_norms[i].normalized_shape[0]
            if f.ndim != 4 or f.shape[:2] != (b, c):
                raise ValueError(f"stage {i} features must be [{b}, {c}, h, w], got {list(f.shape)}")
            q_stage = self.stage_attns[i](q_init, self.stage_norms[i](f.flatten(2).transpose(1, 2)))
            if merged is None:
                merged = q_stage
            else:
                merged = q_stage + self.merge_attns[i - 1](q_init, self.merge_norms[i - 1](merged))
        return self.out_norm(merged)


class AgentRefinement(nn.Module):
    """QueryDiff's feature refinement: decoder pixel features attend to the (optimised) agent
    queries (querydiff-blog, "Feature Refinement and Prediction").

    pixels [B, C, h, w], queries [B, r, query_dim] -> [B, C, h, w]:

        F' = F + Attn(Q = LN(F), K = V = queries)        over the h·w pixel tokens of F
    """

    def __init__(self, channels: int, query_dim: int, heads: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = Attention(channels, heads, query_dim, qkv_bias=True, name="agent.refine")

    def forward(self, pixels: Tensor, queries: Tensor) -> Tensor:
        c = self.norm.normalized_shape[0]
        if pixels.ndim != 4 or pixels.shape[1] != c:
            raise ValueError(f"pixels must be [B, {c}, h, w], got {list(pixels.shape)}")
        q_dim = self.attn.to_k.in_features
        if queries.ndim != 3 or queries.shape[0] != pixels.shape[0] or queries.shape[2] != q_dim:
            raise ValueError(f"queries must be [{pixels.shape[0]}, r, {q_dim}], got {list(queries.shape)}")
        tokens = pixels.flatten(2).transpose(1, 2)  # [B, h·w, C]
        refined = tokens + self.attn(self.norm(tokens), queries)
        return refined.transpose(1, 2).reshape(pixels.shape)
