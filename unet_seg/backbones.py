"""Backbones with Rein (Wei et al., "Stronger, Fewer, & Superior", CVPR 2024) for the
domain-generalisation recipes: images [B, 3, H, W] in [-1, 1] -> 4 maps at strides 4, 8, 16, 32;
`.channels` gives their widths, `.reins.tokens()` Rein's per-layer tokens [L, m, C].

    DINOv2         timm's DINOv2 ViT (`vit_*_patch14_dinov2`) in plain PyTorch, parameters named as
                   timm's hub checkpoints (`load_dinov2`: DINOV2_HUB or a local folder in that layout)
    Reins          LoRA tokens refining every layer's features (w1oves/Rein `LoRAReins`)
    ReinDINOv2     DINOv2 ViT-L/14 resampled to patch 16, frozen, + Reins
    ReinConvNet    a small CNN with the same interface, trained in full, for CPU demos
    release_patch16   the release's /14 -> /16 conversion of a DINOv2 state dict (bicubic kernel and
                      position embedding; `resize_patch_kernel`, `resize_pos_embed`)
    flexivit_patch16  timm's conversion (FlexiViT's pseudo-inverse kernel, antialiased position embedding)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.layers import filled

DINOV2_HUB = "timm/vit_large_patch14_dinov2.lvd142m"  # model.safetensors, config.json


@dataclass(frozen=True)
class DINOv2Config:
    """A DINOv2 ViT (Oquab et al. 2023) as timm builds `vit_*_patch14_dinov2`: class token, learned
    position embedding for an `image_size` / `patch_size` grid (resampled for other inputs), pre-norm
    blocks with LayerScale, LayerNorm eps 1e-6, erf GELU."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 518
    init_values: float = 1e-5  # LayerScale's γ at initialisation

    def __post_init__(self):
        if min(self.width, self.layers, self.heads, self.patch_size, self.image_size) < 1 or self.width % self.heads:
            raise ValueError(f"sizes must be positive and width divisible by heads, got {self}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


DINOV2_L14 = DINOv2Config()
DINOV2_PRESETS = {  # timm's architecture names (config.json "architecture")
    "vit_small_patch14_dinov2": replace(DINOV2_L14, width=384, layers=12, heads=6),
    "vit_base_patch14_dinov2": replace(DINOV2_L14, width=768, layers=12, heads=12),
    "vit_large_patch14_dinov2": DINOV2_L14,
}
TINY_DINOV2 = replace(DINOV2_L14, width=32, heads=2)  # tests: ViT-L's 24 blocks and grid, 32 wide
TIMM_ARGS = {"embed_dim": "width", "depth": "layers", "num_heads": "heads", "mlp_ratio": "mlp_ratio", "patch_size": "patch_size",
             "img_size": "image_size", "init_values": "init_values"}  # fmt: skip


def imagenet_normalise(x: Tensor) -> Tensor:
    """[-1, 1] RGB -> ImageNet mean/std normalised."""
    mean = filled([0.485, 0.456, 0.406], x).view(1, 3, 1, 1)
    std = filled([0.229, 0.224, 0.225], x).view(1, 3, 1, 1)
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


def resize_pos_embed(pos: Tensor, grid: tuple[int, int], prefix: int = 1, antialias: bool = False) -> Tensor:
    """Position embedding [1, prefix + n², C] (square n × n grid after `prefix` tokens) -> [1, prefix
    + gh·gw, C], bicubic, without antialiasing (the release's conversion) or with it (timm's)."""
    head, tokens = pos[:, :prefix], pos[:, prefix:]
    n = math.isqrt(tokens.shape[1])
    if n * n != tokens.shape[1]:
        raise ValueError(f"position embedding must hold {prefix} prefix tokens and a square grid, got {tuple(pos.shape)}")
    grid_map = tokens.reshape(1, n, n, -1).permute(0, 3, 1, 2).to(torch.promote_types(pos.dtype, torch.float32))
    resized = F.interpolate(grid_map, size=tuple(grid), mode="bicubic", align_corners=False, antialias=antialias)
    return torch.cat([head, resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)], dim=1)


def resize_patch_kernel_pinv(weight: Tensor, size: int) -> Tensor:
    """FlexiViT's resize (timm's `resample_patch_embed`): the kernel w' [C, 3, size, size] of least
    norm with ⟨w', resize(x)⟩ = ⟨w, x⟩ for every patch x [p, p], resize = antialiased bicubic, so a
    patch keeps its response: w' = pinv(Rᵀ) w with R [size², p²] the resize as a matrix."""
    p = weight.shape[-1]
    basis = torch.eye(p * p, dtype=torch.float64).view(p * p, 1, p, p)
    rows = F.interpolate(basis, size=(size, size), mode="bicubic", align_corners=False, antialias=True).view(p * p, size * size)  # Rᵀ
    flat = weight.reshape(-1, p * p).to(torch.float64) @ torch.linalg.pinv(rows).T.to(weight.device)
    return flat.reshape(*weight.shape[:2], size, size).to(weight.dtype)


def release_patch16(state: dict, grid: tuple[int, int], prefix: int = 1, patch: int = 16) -> dict:
    """A DINOv2 /14 state dict (timm names) converted as the release's `convert_dinov2` does: the
    patch kernel resized to `patch`, the position embedding to the `grid` of the crop (crop / 16)."""
    out = dict(state)
    out["patch_embed.proj.weight"] = resize_patch_kernel(state["patch_embed.proj.weight"], patch)
    out["pos_embed"] = resize_pos_embed(state["pos_embed"], grid, prefix)
    return out


def flexivit_patch16(state: dict, grid: tuple[int, int], prefix: int = 1, patch: int = 16) -> dict:
    """The same conversion as timm's `create_model(..., patch_size=16)` makes when loading the /14
    weights: the pseudo-inverse kernel, the position embedding resized bicubically with antialiasing."""
    out = dict(state)
    out["patch_embed.proj.weight"] = resize_patch_kernel_pinv(state["patch_embed.proj.weight"], patch)
    out["pos_embed"] = resize_pos_embed(state["pos_embed"], grid, prefix, antialias=True)
    return out


# ---------------------------------------------------------------------------------------------
# DINOv2 in plain PyTorch, parameter names as timm's VisionTransformer


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """x += γ₁ · Attn(LN₁ x);  x += γ₂ · MLP(LN₂ x)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        c = cfg.width
        self.norm1, self.norm2 = nn.LayerNorm(c, eps=1e-6), nn.LayerNorm(c, eps=1e-6)
        self.attn = SelfAttention(c, cfg.heads)
        self.ls1, self.ls2 = LayerScale(c, cfg.init_values), LayerScale(c, cfg.init_values)
        hidden = int(c * cfg.mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """images [B, 3, H, W] (ImageNet-normalised, sides multiples of the patch) -> tokens [B, 1 + hw, C]
    (class token first), final LayerNorm applied; `embed` and `blocks` for the layers in between.
    Inputs of another grid than the config's get the position embedding resampled as timm's
    `dynamic_img_size` does (bicubic, antialiased)."""

    def __init__(self, cfg: DINOv2Config = DINOV2_L14):
        super().__init__()
        self.config, c = cfg, cfg.width
        self.cls_token = nn.Parameter(torch.randn(1, 1, c) * 1e-6)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.grid**2, c) * 0.02)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, c, cfg.patch_size, stride=cfg.patch_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(c, eps=1e-6)

    def embed(self, x: Tensor) -> Tensor:
        patches = self.patch_embed.proj(x)  # [B, C, h, w]
        grid = tuple(patches.shape[2:])
        pos = self.pos_embed if grid == (self.config.grid,) * 2 else resize_pos_embed(self.pos_embed, grid, antialias=True)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches.flatten(2).transpose(1, 2)], dim=1) + pos

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)


def dinov2_config(timm_config: dict) -> DINOv2Config:
    """timm's hub config.json (`architecture`, optional `model_args`) -> DINOv2Config."""
    arch, args = timm_config.get("architecture"), timm_config.get("model_args", {})
    if arch not in DINOV2_PRESETS:
        raise ValueError(f"architecture {arch!r} is not one of timm's DINOv2 ViTs {sorted(DINOV2_PRESETS)}")
    unknown = sorted(set(args) - set(TIMM_ARGS))
    if unknown:
        raise ValueError(f"model_args {unknown} are not supported (only {sorted(TIMM_ARGS)})")
    return replace(DINOV2_PRESETS[arch], **{TIMM_ARGS[k]: v for k, v in args.items()})


def load_dinov2(src: Union[str, os.PathLike] = DINOV2_HUB, *, revision: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> tuple[DINOv2Config, dict]:
    """timm's DINOv2 checkpoint (hub repo id, or a local folder with its `config.json` and
    `model.safetensors`) -> (config, state dict), checked against the model it describes
    (CheckpointError naming missing and unexpected keys, shape mismatches)."""
    from .errors import CheckpointError
    from .hub import check_state_dict, fetch_files, read_json, read_safetensors

    folder = fetch_files(src, "", ["config.json", "model.safetensors"], revision=revision)
    try:
        cfg = dinov2_config(read_json(folder / "config.json"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from e
    state = read_safetensors([folder / "model.safetensors"], dtype=dtype)
    with torch.device("meta"):
        check_state_dict(DINOv2(cfg).state_dict(), state, str(folder / "model.safetensors"))
    return cfg, state


class ReinDINOv2(nn.Module):
    """DINOv2 ViT (frozen, patch embedding resampled to 16) with trainable Reins after every block;
    the outputs of blocks 7, 11, 15, 23 resized ×4, ×2, ×1, ×½ (as the release does).

    weights: timm's DINOv2 checkpoint (`load_dinov2`), or None for random weights of `config`.
    patch_resize: "bicubic" converts the /14 weights as the release (`release_patch16`); "pinv" as
    timm's `patch_size=16` does (`flexivit_patch16`)."""

    def __init__(self, weights: Union[str, os.PathLike, None] = DINOV2_HUB, img_size: int = 512, tokens: int = 100, out_indices=(7, 11, 15, 23),
                 patch_resize: str = "bicubic", config: DINOv2Config = DINOV2_L14):  # fmt: skip
        super().__init__()
        from .hub import build_with_weights

        if patch_resize not in ("bicubic", "pinv"):
            raise ValueError(f"patch_resize must be 'bicubic' or 'pinv', got {patch_resize!r}")
        if weights is not None:
            config, state = load_dinov2(weights)
        cfg = replace(config, patch_size=16, image_size=img_size)
        if weights is None:
            self.vit = DINOv2(cfg)
        else:
            convert = release_patch16 if patch_resize == "bicubic" else flexivit_patch16
            self.vit = build_with_weights(lambda: DINOv2(cfg), convert(state, (cfg.grid,) * 2), str(weights))
        self.vit.requires_grad_(False)
        if max(out_indices) >= cfg.layers:
            raise ValueError(f"out_indices {out_indices} need {max(out_indices) + 1} blocks, the ViT has {cfg.layers}")
        self.reins = Reins(cfg.layers, cfg.width, tokens)
        self.out_indices = tuple(out_indices)
        self.channels = (cfg.width,) * 4

    def forward(self, x: Tensor) -> list[Tensor]:
        b, _, h, w = x.shape
        t, outs = self.vit.embed(imagenet_normalise(x)), []
        for i, block in enumerate(self.vit.blocks):
            t = self.reins(block(t), i, 1)
            if i in self.out_indices:
                outs.append(t[:, 1:].transpose(1, 2).reshape(b, -1, h // 16, w // 16))
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
