"""The Stable Diffusion VAE (AutoencoderKL), speaking *scaled* latents.

    vae.encode(img) -> z       img [B, 3, H, W] in [-1, 1]  ->  z [B, 4, H/8, W/8] = mean · scaling_factor
    vae.decode(z)   -> img     the inverse direction; output ≈ [-1, 1] (not clamped)
    vae.posterior(img) -> p    [B, 2, 4, H/8, W/8]: μ, σ of z;  sample_latent(p) draws z = μ + σ·ε

The VAE computes in its own parameter dtype: keep it in float32 (`vae.float()`) beside a bf16
U-Net and it casts inputs in and outputs back, with autocast switched off inside.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Attention, Downsample, ResBlock, Upsample


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215


SD_VAE = VAEConfig()
TINY_VAE = replace(SD_VAE, channels=(32, 32, 64, 64), layers_per_block=1)


class SpatialSelfAttention(Attention):
    """GroupNorm, single-head self-attention over the h·w positions, residual. [B, c, h, w] -> same."""

    def __init__(self, c: int, groups: int):
        super().__init__(c, heads=1, qkv_bias=True, name="vae.mid.attn")
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = super().forward(self.group_norm(x).flatten(2).transpose(1, 2))
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(c, c, None, groups, 1e-6), ResBlock(c, c, None, groups, 1e-6)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(c, groups)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(c_in if j == 0 else c_out, c_out, None, groups, 1e-6) for j in range(n)])
        self.downsamplers = nn.ModuleList([Downsample(c_out, pad_asymmetric=True)] if down else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n: int, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(c_in if j == 0 else c_out, c_out, None, groups, 1e-6) for j in range(n)])
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if up else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nn.Module):
    """img [B, 3, H, W] -> latent moments [B, 2·latent_channels, H/8, W/8] (before quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n, g = cfg.channels, cfg.layers_per_block, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [EncoderBlock(ch[max(i - 1, 0)], ch[i], n, g, down=i < len(ch) - 1) for i in range(len(ch))]
        )
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """latent [B, latent_channels, h, w] (after post_quant_conv) -> img [B, 3, 8h, 8w]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rev, n, g = cfg.channels[::-1], cfg.layers_per_block + 1, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], g)
        self.up_blocks = nn.ModuleList(
            [DecoderBlock(rev[max(i - 1, 0)], rev[i], n, g, up=i < len(rev) - 1) for i in range(len(rev))]
        )
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def sample_latent(posterior: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """posterior [..., 2, C, h, w] (μ, σ) -> z = μ + σ·ε [..., C, h, w], ε ~ N(0, 1) in the
    posterior's dtype and device, from `generator` (default: the global RNG)."""
    mean, std = posterior.unbind(-4)
    return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = SD_VAE):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    def encode(self, img: Tensor, sample: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
        """img [B, C, H, W] in [-1, 1], H and W multiples of 8 -> scaled latent [B, 4, H/8, W/8].

        The posterior mean by default; `sample=True` draws z = μ + σ·ε (ε from `generator`),
        `latent_cache.sample_latent` of `posterior(img)`.
        """
        post = self.posterior(img)
        return (sample_latent(post, generator) if sample else post[:, 0]).to(img.dtype)

    def posterior(self, img: Tensor) -> Tensor:
        """img [B, C, H, W] in [-1, 1] -> the latent posterior N(μ, σ²) in scaled latent units,
        [B, 2, 4, H/8, W/8] (μ, σ), in the VAE's dtype."""
        self._check(img, self.config.in_channels, "img", self.downscale)
        with self._own_precision(img):
            mean, logvar = self.quant_conv(self.encoder(img.to(self._dtype))).chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            return torch.stack([mean, std], dim=1) * self.config.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent [B, 4, h, w] -> image [B, C, h·8, w·8] in ≈[-1, 1]."""
        self._check(z, self.config.latent_channels, "z", 1)
        with self._own_precision(z):
            x = self.post_quant_conv(z.to(self._dtype) / self.config.scaling_factor)
            return self.decoder(x).to(z.dtype)

    @property
    def _dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def _own_precision(self, x: Tensor):
        """Autocast off while the VAE's weights are float32, so it really computes in float32;
        otherwise the caller's autocast state stands."""
        return torch.autocast(x.device.type, enabled=False) if self._dtype == torch.float32 else nullcontext()

    @staticmethod
    def _check(x: Tensor, channels: int, name: str, multiple: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must be [B, {channels}, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"{name} height and width must be multiples of {multiple}, got {tuple(x.shape[2:])}")
