"""unet_seg: segmentation with Stable Diffusion U-Nets, in plain PyTorch.

Models live in `unet_seg.models`; whole checkpoints load with `load_sd`; the primitives are
modules of their own (`diffusion`, `taps`, `attention`, `codecs`, `losses`, `metrics`).
"""

from .hub import CheckpointError
from .sd import StableDiffusion, load_sd

__version__ = "0.1.0"
__all__ = ["load_sd", "StableDiffusion", "CheckpointError", "__version__"]
