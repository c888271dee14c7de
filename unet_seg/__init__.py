"""unet_seg: segmentation with Stable Diffusion U-Nets, in plain PyTorch.

Models live in `unet_seg.models`; whole checkpoints load with `load_sd`; the primitives are
modules of their own (`diffusion`, `taps`, `attention`, `codecs`, `losses`, `metrics`).
`import unet_seg` itself does not import torch (`unet_seg.cli` parses recipe command lines
before the seconds that takes); `load_sd` and `StableDiffusion` import it on first use.
"""

from .errors import CheckpointError

__version__ = "0.1.0"
__all__ = ["load_sd", "StableDiffusion", "CheckpointError", "__version__"]


def __getattr__(name: str):
    if name in ("load_sd", "StableDiffusion"):
        from . import sd

        return getattr(sd, name)
    raise AttributeError(f"module 'unet_seg' has no attribute {name!r}")
