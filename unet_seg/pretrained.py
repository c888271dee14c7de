"""One network in the hub layout, read or written.

    unet = from_pretrained(UNet, "stabilityai/stable-diffusion-2-1-base")  # its unet/ subfolder
    vae = from_pretrained(AutoencoderKL, "path/to/folder", subfolder="vae", dtype=torch.float32)
    save_pretrained(unet, "out/unet")        # config.json + safetensors, atomically; diffusers reads it
    text, vision = load_clip("openai/clip-vit-large-patch14")   # both towers of a full CLIP checkpoint

The networks in `unet_seg.models` know nothing of files or the hub. `HUB_LAYOUT` says, for each,
where it lives in a checkpoint, how its config.json reads and how its file's keys are renamed;
`unet_seg.hub_config` converts the configs and `unet_seg.hub` finds and reads the files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple, Optional, TypeVar, Union

import torch
from torch import Tensor, nn

from .hub import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, build_with_weights, clip_text_keys, component_files, load_model
from .hub import read_safetensors, save_component
from .hub_config import text_from_transformers, to_hub, unet_from_diffusers, vae_from_diffusers, vision_from_transformers
from .models.clip import CLIPTextEncoder, CLIPTextEncoderWithProjection
from .models.clip_vision import CLIPVisionEncoder
from .models.unet import UNet
from .models.vae import AutoencoderKL

M = TypeVar("M", bound=nn.Module)


class HubLayout(NamedTuple):
    subfolder: str  # the component's folder in a checkpoint
    weights: str  # the safetensors file stem
    read_config: Callable[[dict], object]  # config.json dict -> the network's config dataclass
    keys: Callable[[dict[str, Tensor]], dict[str, Tensor]] = lambda sd: sd  # the file's keys -> ours


HUB_LAYOUT: dict[type, HubLayout] = {
    UNet: HubLayout("unet", DIFFUSERS_WEIGHTS, unet_from_diffusers),
    AutoencoderKL: HubLayout("vae", DIFFUSERS_WEIGHTS, vae_from_diffusers),
    CLIPTextEncoder: HubLayout("text_encoder", TRANSFORMERS_WEIGHTS, text_from_transformers, clip_text_keys),
}


def _layout(cls: type) -> HubLayout:
    if cls not in HUB_LAYOUT:
        raise TypeError(f"{cls.__name__} has no hub layout; these do: {', '.join(c.__name__ for c in HUB_LAYOUT)}")
    return HUB_LAYOUT[cls]


def from_pretrained(
    cls: type[M],
    src: Union[str, os.PathLike],
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    variant: Optional[str] = None,
) -> M:
    """A `cls` network (UNet, AutoencoderKL, CLIPTextEncoder) from a hub repo id or a local folder in
    the hub layout (see `unet_seg.hub.component_files`); `subfolder` defaults to the network's own."""
    layout = _layout(cls)
    return load_model(
        lambda config: cls(layout.read_config(config)), src, subfolder=layout.subfolder if subfolder is None else subfolder,
        weights_name=layout.weights, revision=revision, dtype=dtype, device=device, variant=variant, convert=layout.keys,
    )  # fmt: skip


def save_pretrained(model: nn.Module, folder: Union[str, os.PathLike]) -> Path:
    """Write `folder/config.json` + weights in the hub layout (each atomically) -> the folder;
    `from_pretrained` and the reference library (diffusers / transformers) load it."""
    weights = _layout(type(model)).weights
    return save_component(model.state_dict(), to_hub(model.config), folder, weights)


def load_clip(
    src: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
) -> tuple[CLIPTextEncoderWithProjection, CLIPVisionEncoder]:
    """Both towers of a full CLIP checkpoint (transformers' `CLIPModel` layout: `config.json` with
    `text_config`, `vision_config`, `projection_dim`, and `model.safetensors`), e.g. the hub's
    `openai/clip-vit-large-patch14` or a local folder. Safetensors only; `logit_scale` and the
    `position_ids` buffers of old files are dropped. Returns (text, vision), in eval mode."""
    config, files = component_files(src, "", TRANSFORMERS_WEIGHTS, revision=revision)
    if "text_config" not in config or "vision_config" not in config:
        raise ValueError(f"{src}: config.json is not a full CLIP model's (needs text_config and vision_config)")
    projection_dim = config.get("projection_dim", 512)
    text_cfg = text_from_transformers(config["text_config"])
    vision_cfg = vision_from_transformers({**config["vision_config"], "projection_dim": projection_dim})
    weights = read_safetensors(files, dtype=dtype, device=device, keep=lambda k: not k.endswith("position_ids") and k != "logit_scale")
    text = {k: v for k, v in weights.items() if k.startswith("text_model.") or k == "text_projection.weight"}
    vision = {k: v for k, v in weights.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
    text_model = build_with_weights(lambda: CLIPTextEncoderWithProjection(text_cfg, projection_dim), text, f"{src} (text)")
    vision_model = build_with_weights(lambda: CLIPVisionEncoder(vision_cfg), vision, f"{src} (vision)")
    return text_model, vision_model
