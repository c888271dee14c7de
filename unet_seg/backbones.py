"""Backbones with Rein (Wei et al., "Stronger, Fewer, & Superior", CVPR 2024) for the
domain-generalisation recipes: images [B, 3, H, W] in [-1, 1] -> 4 maps at strides 4, 8, 16, 32;
`.channels` gives their widths, `.reins.tokens()` Rein's per-layer tokens [L, m, C].

    Reins          LoRA tokens refining every layer's features (w1oves/Rein `LoRAReins`)
    ReinDINOv2     timm's DINOv2 ViT-L/14 resampled to patch 16, frozen, + Reins (needs timm: `recipes` extra)
    ReinConvNet    a small CNN with the same interface, trained in full, for CPU demos (no timm)
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


class ReinDINOv2(nn.Module):
    """timm's DINOv2 ViT-L (frozen, patch embedding resampled to 16) with trainable Reins after
    every block; the outputs of blocks 7, 11, 15, 23 resized ×4, ×2, ×1, ×½ (as the release does)."""

    def __init__(self, pretrained: bool = True, img_size: int = 512, tokens: int = 100, out_indices=(7, 11, 15, 23)):
        super().__init__()
        import timm  # the `recipes` extra

        self.vit = timm.create_model(
            "vit_large_patch14_dinov2.lvd142m", pretrained=pretrained, patch_size=16, img_size=img_size, dynamic_img_size=True
        )
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
