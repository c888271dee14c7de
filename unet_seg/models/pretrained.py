"""`from_pretrained` / `save_pretrained` for the networks, written once.

A network class says where its weights live in the hub layout and which config it takes:

    class UNet(Pretrained, nn.Module):
        hub_subfolder, hub_weights, config_class = "unet", "diffusion_pytorch_model", UNetConfig

The config.json <-> config conversion is `unet_seg.hub_config`'s, the files `unet_seg.hub`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, TypeVar, Union

import torch
from torch import Tensor

M = TypeVar("M", bound="Pretrained")


class Pretrained:
    hub_subfolder: str  # the component's folder in a checkpoint ("unet", "vae", "text_encoder")
    hub_weights: str  # the safetensors file stem ("diffusion_pytorch_model" or "model")
    config_class: type  # the model's config dataclass (`unet_seg.hub_config.from_hub` reads config.json into it)
    hub_keys: Optional[Callable[[dict[str, Tensor]], dict[str, Tensor]]] = None  # renames the file's keys to ours

    @classmethod
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
        """From a hub repo id or a local folder in the hub layout (see `unet_seg.hub.component_files`);
        `subfolder` defaults to the class's `hub_subfolder`."""
        from ..hub import load_model
        from ..hub_config import from_hub

        return load_model(
            lambda config: cls(from_hub(cls.config_class, config)), src, subfolder=cls.hub_subfolder if subfolder is None else subfolder,
            weights_name=cls.hub_weights, revision=revision, dtype=dtype, device=device, variant=variant,
            convert=cls.hub_keys or (lambda sd: sd),
        )  # fmt: skip

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> Path:
        """Write `folder/config.json` + weights in the hub layout (atomically); our `from_pretrained`
        and the reference library load it."""
        from ..hub import save_component
        from ..hub_config import to_hub

        return save_component(self.state_dict(), to_hub(self.config), folder, self.hub_weights)
