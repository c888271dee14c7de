"""Backbones with Rein (Wei et al., "Stronger, Fewer, & Superior", CVPR 2024) for the
domain-generalisation recipes: images [B, 3, H, W] in [-1, 1] -> 4 maps at strides 4, 8, 16, 32;
`.channels` gives their widths, `.reins.tokens()` Rein's per-layer tokens [L, m, C].

    Reins          LoRA tokens refining every layer's features (w1oves/Rein `LoRAReins`)
    ReinDINOv2     timm's DINOv2 ViT-L/14 resampled to patch 16, frozen, + Reins (needs timm: `recipes` extra)
    ReinConvNet    a small CNN with the same interface, trained in full, for CPU demos (no timm)
    release_patch16   the release's /14 -> /16 conversion of a DINOv2 state dict (bicubic kernel and
                      position embedding; `resize_patch_kernel`, `resize_pos_embed`)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def imagenet_normalise(x: Tensor) -> Tensor:
    """[-1, 1] RGB -> ImageNet mean/std normalised."""
    mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


class Reins(nn.Module):
    """Rein with LoRA tokens: per layer l, tokens T_l = A_l B_l [m, C] refine the features
    f [B, N, C] (the prefix tokens pass unchanged):

        a  = softmax_m(f T_lᵀ / √C)                         [B, N, m]
        f ← f + s · MLP_Δ(a[:, :, 1:] MLP_T(T_l[1:]) + f)   s a learnable scalar, 1e-3 at start
    """

    def __init__(self, layers: int, dim: int, tokens: int = 100, rank: int = 16, patch: int = 16):
        super().__init__()
        bound = math.sqrt(6.0 / (3 * patch * patch + math.sqrt(dim * rank)))  # Rein's LoRA init
        self.tokens_a = nn.Parameter(torch.empty(layers, tokens, rank).uniform_(-bound, bound))
        self.tokens_b = nn.Parameter(torch.empty(layers, rank, dim).uniform_(-bound, bound))
        self.scale = nn.Parameter(torch.tensor(1e-3))
        self.token_to_feat = nn.Linear(dim, dim)
        self.delta = nn.Linear(dim, dim)

    def tokens(self) -> Tensor:
        """All layers' tokens [L, m, C] (the release's `get_tokens(-1)`)."""
        return self.tokens_a @ self.tokens_b

    def forward(self, x: Tensor, layer: int, prefix: int = 0) -> Tensor:
        head, f = x[:, :prefix], x[:, prefix:]
        t = self.tokens_a[layer] @ self.tokens_b[layer]
        a = (f @ t.T * f.shape[-1] ** -0.5).softmax(-1)
        delta = self.delta(a[..., 1:] @ self.token_to_feat(t[1:]) + f)
        return torch.cat([head, f + self.scale * delta], dim=1)


def resize_patch_kernel(weight: Tensor, size: int) -> Tensor:
    """Patch-embedding kernel [C, 3, p, p] -> [C, 3, size, size] by bicubic interpolation of its
    values (half-pixel centres, no antialiasing): Rein's and QueryDiff's `convert_dinov2` for
    DINOv2's 14 -> 16. The values are kept, so a patch of smooth content responds (16/14)² ≈ 1.31
    times as strongly; FlexiViT's pseudo-inverse resize (timm's `patch_size=16`) keeps the response."""
    x = weight.to(torch.promote_types(weight.dtype, torch.float32))  # bf16/fp16 weights resized in fp32
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).to(weight.dtype)


def resize_pos_embed(pos: Tensor, grid: tuple[int, int], prefix: int = 1) -> Tensor:
    """Position embedding [1, prefix + n², C] (square n × n grid after `prefix` tokens) -> [1, prefix
    + gh·gw, C], bicubic without antialiasing (the release's conversion; timm's antialiases)."""
    head, tokens = pos[:, :prefix], pos[:, prefix:]
    n = math.isqrt(tokens.shape[1])
    if n * n != tokens.shape[1]:
        raise ValueError(f"position embedding must hold {prefix} prefix tokens and a square grid, got {tuple(pos.shape)}")
    grid_map = tokens.reshape(1, n, n, -1).permute(0, 3, 1, 2).to(torch.promote_types(pos.dtype, torch.float32))
    resized = F.interpolate(grid_map, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([head, resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)], dim=1)


def release_patch16(state: dict, grid: tuple[int, int], prefix: int = 1, patch: int = 16) -> dict:
    """A DINOv2 /14 state dict (timm names) converted as the release's `convert_dinov2` does: the
    patch kernel resized to `patch`, the position embedding to the `grid` of the crop (crop / 16)."""
    out = dict(state)
    out["patch_embed.proj.weight"] = resize_patch_kernel(state["patch_embed.proj.weight"], patch)
    out["pos_embed"] = resize_pos_embed(state["pos_embed"], grid, prefix)
    return out


class ReinDINOv2(nn.Module):
    """timm's DINOv2 ViT-L (frozen, patch embedding resampled to 16) with trainable Reins after
    every block; the outputs of blocks 7, 11, 15, 23 resized ×4, ×2, ×1, ×½ (as the release does).

    patch_resize: "bicubic" converts the /14 weights as the release (`release_patch16`); "pinv"
    lets timm resample them (FlexiViT's pseudo-inverse kernel, antialiased position embedding)."""

    def __init__(self, pretrained: bool = True, img_size: int = 512, tokens: int = 100, out_indices=(7, 11, 15, 23), patch_resize: str = "bicubic"):
        super().__init__()
        import timm  # the `recipes` extra

        if patch_resize not in ("bicubic", "pinv"):
            raise ValueError(f"patch_resize must be 'bicubic' or 'pinv', got {patch_resize!r}")
        name = "vit_large_patch14_dinov2.lvd142m"
        self.vit = timm.create_model(name, pretrained=pretrained and patch_resize == "pinv", patch_size=16, img_size=img_size, dynamic_img_size=True)
        if pretrained and patch_resize == "bicubic":
            state = timm.create_model(name, pretrained=True).state_dict()  # the /14 weights as published
            self.vit.load_state_dict(release_patch16(state, self.vit.patch_embed.grid_size, self.vit.num_prefix_tokens))
        self.vit.requires_grad_(False)
        self.reins = Reins(len(self.vit.blocks), self.vit.embed_dim, tokens)
        self.out_indices = tuple(out_indices)
        self.channels = (self.vit.embed_dim,) * 4

    def forward(self, x: Tensor) -> list[Tensor]:
        b, _, h, w = x.shape
        t = self.vit.norm_pre(self.vit._pos_embed(self.vit.patch_embed(imagenet_normalise(x))))
        prefix, outs = self.vit.num_prefix_tokens, []
        for i, block in enumerate(self.vit.blocks):
            t = self.reins(block(t), i, prefix)
            if i in self.out_indices:
                outs.append(t[:, prefix:].transpose(1, 2).reshape(b, -1, h // 16, w // 16))
        return [F.interpolate(f, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else f for f, s in zip(outs, (4, 2, 1, 0.5))]


def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(8, c_out), nn.ReLU(inplace=True))


class ReinConvNet(nn.Module):
    """The demos' small CNN (trained in full) with Reins after each of its 4 stages (one Rein
    'layer' per stage, all stages `width` wide): strides 4, 8, 16, 32."""

    def __init__(self, width: int = 64, tokens: int = 100):
        super().__init__()
        self.channels = (width,) * 4
        self.stem = nn.Sequential(_conv(3, width // 2, 2), _conv(width // 2, width, 2), _conv(width, width, 1))
        self.stages = nn.ModuleList([nn.Sequential(_conv(width, width, 2), _conv(width, width, 1)) for _ in range(3)])
        self.reins = Reins(4, width, tokens)

    def forward(self, x: Tensor) -> list[Tensor]:
        out, f = [], x
        for i, block in enumerate([self.stem, *self.stages]):
            f = block(f)
            b, c, h, w = f.shape
            f = self.reins(f.flatten(2).transpose(1, 2), i).transpose(1, 2).reshape(b, c, h, w)
            out.append(f)
        return out
