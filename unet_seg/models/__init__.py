"""The Stable Diffusion networks, each in one file: U-Net, VAE, CLIP text encoder and tokenizer.

One dtype rule for every model here: floating inputs may come in any float dtype; a model casts
them to its parameters' dtype on entry (under autocast, autocast then picks the compute dtype)
and returns its result in the dtype of its main floating input, the caller's working dtype:

    unet(x, t, context)         -> dtype of x        (context cast like x; `features` stay in the compute dtype)
    vae.encode(img), decode(z)  -> dtype of img / z  (a float32 VAE also switches autocast off inside)
    text_encoder(ids)           -> parameters' dtype (token ids carry no float dtype)
    clip_vision(pixels)         -> parameters' dtype (CLIP-preprocessed pixels, not a working tensor)

So a float32 caller gets float32 back from a bf16 U-Net beside a float32 VAE, with no casts by
hand; `model.to(dtype)` alone decides where the FLOPs run.
"""

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
