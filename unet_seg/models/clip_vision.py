"""The CLIP vision transformer (ViT) with its projection into the joint image-text space.

    encoder(pixels) -> (patch_tokens, image_embeds)
        pixels [B, 3, S, S], CLIP-normalised (`clip_preprocess`), S = image_size
        patch_tokens [B, (S/patch)², width]   last layer's output, class token removed
        image_embeds [B, projection_dim]      post-LayerNorm class token, projected (not L2-normalised)
    encoder.project(tokens) -> [..., projection_dim]   the same head applied to any tokens

DiGSeg (appendix A.3) selects candidate classes with CLIP ViT-L/14: cos(image_embeds, t_c) > 0.25
globally, plus classes with max_p cos(v_p, t_c) > τ_patch for patch tokens v_p, which must first
be mapped into the joint space with `project`.

Parameter names are those of transformers' `CLIPVisionModelWithProjection` (`vision_model.*`,
`vision_model.pre_layrnorm` spelt as published, `visual_projection.weight`), so its
`model.safetensors` loads with no renaming. A full `CLIPModel` file (e.g. openai/clip-vit-large-patch14)
holds these same keys beside `text_model.*`, `text_projection.weight` and `logit_scale`; files from
transformers before 4.31 also hold `vision_model.embeddings.position_ids`, which is computed here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip import CLIPTextEncoderWithProjection, EncoderLayer
from .layers import filled

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    projection_dim: int = 768
    act: str = "quick_gelu"  # "quick_gelu" (x·σ(1.702x), OpenAI CLIP) or "gelu" (erf GELU)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"act must be 'quick_gelu' or 'gelu', got {self.act!r}")
        sizes = (self.image_size, self.patch_size, self.width, self.layers, self.heads, self.mlp_dim)
        if min(*sizes, self.projection_dim) < 1:
            raise ValueError(f"sizes must be positive, got {self}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


VIT_L14 = CLIPVisionConfig()  # OpenAI CLIP ViT-L/14 at 224 px: 16×16 patches
TINY_VIT = replace(VIT_L14, image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, projection_dim=16)


class CLIPVisionOutput(NamedTuple):
    patch_tokens: Tensor  # [B, N, width]
    image_embeds: Tensor  # [B, projection_dim]


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(cfg.width) * cfg.width**-0.5)
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.grid**2 + 1, cfg.width)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, S, S] -> [class token, patches in row-major order] + positions [B, 1 + N, width]."""
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        positions = torch.arange(patches.shape[1] + 1, device=pixels.device)
        return torch.cat([cls, patches], dim=1) + self.position_embedding(positions)


class CLIPVisionEncoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig = VIT_L14):
        super().__init__()
        self.config = cfg
        # Containers only, so that parameter names match transformers' `vision_model.*` layout.
        self.vision_model = nn.ModuleDict(
            dict(
                embeddings=VisionEmbeddings(cfg),
                pre_layrnorm=nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps),
                encoder=nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(cfg, causal=False) for _ in range(cfg.layers)))),
                post_layernorm=nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps),
            )
        )
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, pixels: Tensor) -> CLIPVisionOutput:
        """pixels [B, 3, S, S] float, CLIP-normalised -> (patch_tokens [B, N, width],
        image_embeds [B, projection_dim]), both in the parameters' dtype."""
        self._check(pixels)
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels.to(self.visual_projection.weight.dtype)))
        for layer in vm.encoder.layers:
            x = layer(x)
        return CLIPVisionOutput(patch_tokens=x[:, 1:], image_embeds=self.project(x[:, 0]))

    def project(self, tokens: Tensor) -> Tensor:
        """Last-layer tokens [..., width] -> joint image-text space [..., projection_dim] (the head
        that makes `image_embeds` from the class token; applied to patch tokens for DiGSeg's
        patch-level refinement)."""
        if tokens.shape[-1] != self.config.width:
            raise ValueError(f"tokens must be [..., {self.config.width}], got shape {tuple(tokens.shape)}")
        return self.visual_projection(self.vision_model.post_layernorm(tokens))

    def _check(self, pixels: Tensor) -> None:
        s = self.config.image_size
        if not pixels.is_floating_point():
            raise TypeError(f"pixels must be a floating-point tensor, got {pixels.dtype}")
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2:] != (s, s):
            raise ValueError(f"pixels must be [B, 3, {s}, {s}] (see clip_preprocess), got shape {tuple(pixels.shape)}")


def clip_preprocess(img: Tensor, size: int = 224) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] (the SD/VAE convention) -> CLIP input [B, 3, size, size].

    As transformers' `CLIPImageProcessor`, on tensors: bicubic resize (antialiased) of the shorter
    side to `size`, the longer to int(size·long/short), a centred crop, values clamped to [0, 1]
    as an 8-bit image would be, then (x - CLIP_MEAN) / CLIP_STD. Without the PIL round trip the
    result differs from the processor's by the 8-bit rounding and PIL's bicubic kernel.
    """
    if not img.is_floating_point():
        raise TypeError(f"img must be a floating-point tensor in [-1, 1], got {img.dtype}")
    if img.ndim != 4 or img.shape[1] != 3 or min(img.shape[2:]) < 1:
        raise ValueError(f"img must be [B, 3, H, W] with H, W >= 1, got shape {tuple(img.shape)}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    h, w = img.shape[2:]
    short, long = min(h, w), max(h, w)
    resized = (size, int(size * long / short)) if h <= w else (int(size * long / short), size)
    x = F.interpolate(img, size=resized, mode="bicubic", antialias=True, align_corners=False)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    x = ((x[:, :, top : top + size, left : left + size] + 1) / 2).clamp(0, 1)
    mean = filled(CLIP_MEAN, x).view(1, 3, 1, 1)
    std = filled(CLIP_STD, x).view(1, 3, 1, 1)
    return (x - mean) / std
