"""Blocks shared by the U-Net and the VAE.

Module and parameter names follow the diffusers checkpoint layout, so a diffusers state dict
loads with no renaming; other layouts are converted in `unet_seg/hub.py`.

Attention has one call site, `Attention.forward`, which hands `q, k, v` to a processor:

    proc(q, k, v, name) -> out        q [B, heads, Lq, d], k/v [B, heads, Lk, d] -> [B, heads, Lq, d]

`sdpa` is the default. Models take `procs: {layer name: proc}` for one call; every attention
layer knows its stable dotted `name` (e.g. `down.1.attn.0.self`).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttnProc = Callable[[Tensor, Tensor, Tensor, str], Tensor]
Procs = Optional[Mapping[str, AttnProc]]


def filled(values, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Python numbers -> a 1-D tensor of `dtype` (default `like`'s) on `like`'s device, made by
    fills: a CUDA graph can hold fills, not the synchronous host copy of `like.new_tensor(values)`."""
    return torch.stack([like.new_full((), v, dtype=dtype) for v in values])


def capturing(x: Tensor) -> bool:
    """Whether `x`'s CUDA stream is being captured into a graph: a value check there would sync
    with the host and break the capture, so skip it (the graph's warm-up calls make it)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def sdpa(q: Tensor, k: Tensor, v: Tensor, name: str = "") -> Tensor:
    """Default attention processor: softmax(q kᵀ / √d) v through `F.scaled_dot_product_attention`."""
    return F.scaled_dot_product_attention(q, k, v)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep features as SD uses them: [cos | sin], frequency shift 0.

    t: [B] (int or float) -> [B, dim] float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """[B, c] sinusoidal features -> [B, 4c] via Linear-SiLU-Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with an optional timestep-embedding bias and a 1x1 shortcut.

    x [B, c_in, h, w], temb [B, temb_dim] or None -> [B, c_out, h, w].
    """

    def __init__(self, c_in: int, c_out: int, temb_dim: Optional[int] = None, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out) if temb_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, temb: Optional[Tensor] = None) -> Tensor:
        return self.parts(x, temb)[0]

    def parts(self, x: Tensor, temb: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """-> (output, the residual branch: conv2's output before the shortcut is added)."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h, h


class Attention(nn.Module):
    """Multi-head attention whose inner product is delegated to a processor.

    x [B, L, dim], context [B, Lc, context_dim] (None: self-attention) -> [B, L, dim].
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: Optional[int] = None,
        qkv_bias: bool = False,
        name: str = "",
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads, self.name = heads, name
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: Tensor, context: Optional[Tensor] = None, procs: Procs = None) -> Tensor:
        context = x if context is None else context
        b, h = x.shape[0], self.heads
        q = self.to_q(x).unflatten(-1, (h, -1)).transpose(1, 2)
        k = self.to_k(context).unflatten(-1, (h, -1)).transpose(1, 2)
        v = self.to_v(context).unflatten(-1, (h, -1)).transpose(1, 2)
        proc = sdpa if procs is None else procs.get(self.name, sdpa)
        out = proc(q, k, v, self.name)
        return self.to_out[0](out.transpose(1, 2).reshape(b, -1, h * out.shape[-1]))


class GEGLU(nn.Module):
    """Linear to 2·inner, gate one half with GELU of the other: x·GELU(g)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, width ×4 (`net.0` GEGLU, `net.2` output projection, as diffusers)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, name: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, name=f"{name}.self")
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, name=f"{name}.cross")
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, procs: Procs = None) -> Tensor:
        x = x + self.attn1(self.norm1(x), procs=procs)
        x = x + self.attn2(self.norm2(x), context, procs=procs)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, project in (1x1 conv for SD1, linear for SD2), transformer block, project out, residual.

    x [B, c, h, w], context [B, L, context_dim] -> [B, c, h, w].
    """

    def __init__(self, dim: int, heads: int, context_dim: int, linear_proj: bool, name: str, groups: int = 32):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        proj = (lambda: nn.Linear(dim, dim)) if linear_proj else (lambda: nn.Conv2d(dim, dim, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, context_dim, name)])
        self.proj_out = proj()

    def forward(self, x: Tensor, context: Tensor, procs: Procs = None) -> Tensor:
        return self.parts(x, context, procs)[0]

    def parts(self, x: Tensor, context: Tensor, procs: Procs = None) -> tuple[Tensor, Tensor]:
        """-> (output, the transformer block's output before proj_out, as a [B, c, h, w] view)."""
        b, c, h, w = x.shape
        y = self.norm(x)
        if self.linear_proj:
            y = self.proj_in(y.flatten(2).transpose(1, 2))
        else:
            y = self.proj_in(y).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y, context, procs)
        tokens = y.transpose(1, 2).unflatten(2, (h, w))
        if self.linear_proj:
            y = self.proj_out(y).transpose(1, 2).reshape(b, c, h, w)
        else:
            y = self.proj_out(tokens)
        return x + y, tokens


class Downsample(nn.Module):
    """Stride-2 3x3 conv. `pad_asymmetric`: the VAE encoder pads (0,1,0,1) and uses no conv padding."""

    def __init__(self, c: int, pad_asymmetric: bool = False):
        super().__init__()
        self.pad_asymmetric = pad_asymmetric
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0 if pad_asymmetric else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad_asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 (or nearest to `size`, e.g. the U-Net's next skip connection, 2h − 1 for an odd
    side) then 3x3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
