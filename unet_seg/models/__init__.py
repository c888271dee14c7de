"""The Stable Diffusion networks, each in one file: U-Net, VAE, CLIP text encoder and tokenizer."""

from .clip import SD1_TEXT, SD2_TEXT, TINY_SD1_TEXT, TINY_SD2_TEXT, CLIPTextConfig, CLIPTextEncoder
from .tokenizer import CLIPTokenizer
from .unet import SD15, SD21, SD21_BASE, TINY_SD1, TINY_SD2, UNet, UNetConfig
from .vae import SD_VAE, TINY_VAE, AutoencoderKL, VAEConfig

__all__ = [
    "UNet", "UNetConfig", "SD15", "SD21", "SD21_BASE", "TINY_SD1", "TINY_SD2",
    "AutoencoderKL", "VAEConfig", "SD_VAE", "TINY_VAE",
    "CLIPTextEncoder", "CLIPTextConfig", "SD1_TEXT", "SD2_TEXT", "TINY_SD1_TEXT", "TINY_SD2_TEXT",
    "CLIPTokenizer",
]  # fmt: skip
