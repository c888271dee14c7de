"""`from_pretrained` / `save_pretrained` for the networks, written once.

A network class says where its weights live in the hub layout and how its config converts:

    class UNet(Pretrained, nn.Module):
        hub_subfolder, hub_weights = "unet", "diffusion_pytorch_model"
        config_from_hub = staticmethod(UNetConfig.from_diffusers)
        def config_to_hub(self): return {"_class_name": "UNet2DConditionModel", **self.config.to_diffusers()}
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
    config_from_hub: Callable[[dict], object]  # config.json dict -> the model's config
    hub_keys: Optional[Callable[[dict[str, Tensor]], dict[str, Tensor]]] = None  # renames the file's keys to ours

    def config_to_hub(self) -> dict:
        """config.json of this model, in the reference library's format."""
        raise NotImplementedError

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

        return load_model(
            lambda config: cls(cls.config_from_hub(config)), src, subfolder=cls.hub_subfolder if subfolder is None else subfolder,
            weights_name=cls.hub_weights, revision=revision, dtype=dtype, device=device, variant=variant,
            convert=cls.hub_keys or (lambda sd: sd),
        )  # fmt: skip

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> Path:
        """Write `folder/config.json` + weights in the hub layout (atomically); our `from_pretrained`
        and the reference library load it."""
        from ..hub import save_component

        return save_component(self.state_dict(), self.config_to_hub(), folder, self.hub_weights)
