"""`load_sd`: a whole Stable Diffusion checkpoint in one call.

    sd = load_sd("stabilityai/stable-diffusion-2-1-base")      # hub repo id (cached, revision-pinnable)
    sd = load_sd("path/to/diffusers/folder")                     # model_index.json, unet/, vae/, ...
    sd = load_sd("v1-5-pruned-emaonly.safetensors")              # original single-file checkpoint
    context = sd.encode_prompt(["a photo of a cat"])             # [1, 77, D]
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import Tensor

from . import hub, ldm
from .diffusion import NoiseSchedule
from .files import atomic_folder, write_json
from .models.clip import CLIPTextEncoder
from .models.tokenizer import CLIPTokenizer
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .pretrained import HUB_LAYOUT, from_pretrained, save_pretrained

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
TOKENIZER_FILES = ["vocab.json", "merges.txt"], ("tokenizer_config.json", "special_tokens_map.json")
# SD 1.x / 2.x training schedule; single files do not store the prediction type.
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


@dataclass
class StableDiffusion:
    """The networks of one checkpoint (components not asked for are None) and its noise schedule."""

    unet: Optional[UNet]
    vae: Optional[AutoencoderKL]
    text_encoder: Optional[CLIPTextEncoder]
    tokenizer: Optional[CLIPTokenizer]
    schedule: NoiseSchedule
    source: str
    notes: str = ""  # what was inferred rather than read (single files)

    @torch.no_grad()
    def encode_prompt(self, prompts: Union[str, list[str]]) -> Tensor:
        """Prompts -> the U-Net's cross-attention context [B, 77, D]."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("encode_prompt needs the tokenizer and text_encoder components")
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(self.tokenizer(prompts).to(device))


    def save_pretrained(self, folder: Union[str, os.PathLike], readme: Optional[str] = None) -> Path:
        """Write a diffusers-layout folder (model_index.json, unet/, vae/, text_encoder/,
        tokenizer/, scheduler/; `readme` as README.md), atomically: `load_sd` reads it back, and
        diffusers / transformers read each component. A component that is None or has no hub
        layout (the demos' weight-free `BlockCodec`) is listed as null and not written; read
        the folder with `load_sd(folder, components=...)` then. A U-Net with a support conv_in
        writes it as `conv_in_support.*` tensors and `support_in_channels` in its config, which
        diffusers ignores (its U-Net loads without them)."""
        scheduler = {**SD_SCHEDULER, "prediction_type": self.schedule.prediction_type}
        if not torch.allclose(NoiseSchedule.from_config(scheduler).alphas_cumprod, self.schedule.alphas_cumprod.cpu(), rtol=1e-6):
            raise ValueError("only SD's own noise schedule (scaled_linear, 0.00085 -> 0.012, T = 1000) can be written")
        classes = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                   "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer")}  # fmt: skip
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0", "requires_safety_checker": False,
                 "safety_checker": [None, None], "feature_extractor": [None, None], "scheduler": ["diffusers", "DDIMScheduler"]}  # fmt: skip
        with atomic_folder(folder) as tmp:
            for name in COMPONENTS:
                part = getattr(self, name)
                writable = type(part) in HUB_LAYOUT or isinstance(part, CLIPTokenizer)
                index[name] = list(classes[name]) if writable else [None, None]
                if isinstance(part, CLIPTokenizer):
                    part.save_pretrained(tmp / name)
                elif writable:
                    save_pretrained(part, tmp / name)
            write_json(tmp / "scheduler" / "scheduler_config.json", {"_class_name": "DDIMScheduler", **scheduler})
            write_json(tmp / "model_index.json", index)
            if readme:
                (tmp / "README.md").write_text(readme)
        return Path(folder)


def load_sd(
    src: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    components: Optional[Iterable[str]] = None,
    vae_dtype: Optional[torch.dtype] = None,
    prediction_type: Optional[str] = None,
    variant: Optional[str] = None,
) -> StableDiffusion:
    """Load SD 1.x / 2.x from a hub repo id, a diffusers-layout folder or a single `.safetensors`
    file in the original layout. `dtype` defaults to float32; `vae_dtype` (default `dtype`) lets
    the VAE stay float32 beside a bf16 U-Net. `components` picks a subset of
    `unet, vae, text_encoder, tokenizer`. `prediction_type` overrides the checkpoint's (single
    files store none: SD1 is taken as epsilon, SD2 as v_prediction, and `notes` says so)."""
    wanted = tuple(COMPONENTS if components is None else components)
    unknown = sorted(set(wanted) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {COMPONENTS}")
    source = hub.local_or_repo_id(src)  # a mistyped path fails here, before any hub lookup
    if isinstance(source, Path) and source.is_file():
        hub.refuse_pickle(source)
        if source.suffix != ".safetensors":
            raise hub.CheckpointError(f"{source}: unknown checkpoint format (expected .safetensors)")
        return _load_single_file(source, dtype, device, wanted, vae_dtype or dtype, prediction_type)
    if isinstance(source, Path) and not (source / "model_index.json").is_file() and not (source / "unet").is_dir():
        raise hub.CheckpointError(
            f"{source}: unknown layout: expected a diffusers folder (model_index.json, unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/) or a single .safetensors file"
        )
    return _load_diffusers(source, revision, dtype, device, wanted, vae_dtype or dtype, prediction_type, variant)


def _load_diffusers(src, revision, dtype, device, wanted, vae_dtype, prediction_type, variant) -> StableDiffusion:
    def load(model_cls):
        name = {UNet: "unet", AutoencoderKL: "vae", CLIPTextEncoder: "text_encoder"}[model_cls]
        if name not in wanted:
            return None
        return from_pretrained(
            model_cls, src, subfolder=name, revision=revision, dtype=vae_dtype if name == "vae" else dtype, device=device, variant=variant
        )

    def tokenizer() -> CLIPTokenizer:
        folder = hub.fetch_files(src, "tokenizer", *TOKENIZER_FILES, revision=revision)
        try:
            return CLIPTokenizer.from_folder(folder)
        except (ValueError, OSError) as e:  # the tokenizer's messages name the file
            raise hub.CheckpointError(f"{folder}: unusable tokenizer: {e}") from e

    path = hub.fetch_files(src, "scheduler", ["scheduler_config.json"], revision=revision) / "scheduler_config.json"
    config = hub.read_json(path)
    if prediction_type:
        config["prediction_type"] = prediction_type
    try:
        schedule = NoiseSchedule.from_config(config)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise hub.CheckpointError(f"{path}: unusable scheduler config ({e})") from e
    return StableDiffusion(
        unet=load(UNet),
        vae=load(AutoencoderKL),
        text_encoder=load(CLIPTextEncoder),
        tokenizer=tokenizer() if "tokenizer" in wanted else None,
        schedule=schedule,
        source=str(src) + (f" @ {revision}" if revision else ""),
    )


def _load_single_file(path: Path, dtype, device, wanted, vae_dtype, prediction_type) -> StableDiffusion:
    u, v, t = ldm.split(hub.read_shapes(path))  # configs come from shapes; weights are read per component
    if not u:
        raise hub.CheckpointError(f"{path}: no `{ldm.UNET_PREFIX}*` tensors: not an original-layout SD checkpoint")
    proj_in = [s for k, s in u.items() if k.endswith("proj_in.weight")]
    if not proj_in:
        raise hub.CheckpointError(f"{path}: no `{ldm.UNET_PREFIX}*proj_in.weight` tensor: cannot tell SD1 from SD2")
    sd2 = proj_in[0].ndim == 2
    prediction_type = prediction_type or ("v_prediction" if sd2 else "epsilon")
    notes = (
        f"inferred {'SD2' if sd2 else 'SD1'} from the tensor shapes of {path.name} "
        f"({'linear' if sd2 else 'convolutional'} attention projections, "
        f"{'OpenCLIP' if ldm.is_openclip(t) else 'CLIP'} text encoder); prediction type {prediction_type}"
        + (" (assumed, as for SD 2.x-768; pass prediction_type='epsilon' for 2.x-base)" if sd2 and "v" in prediction_type else "")
    )

    def build(name: str, prefix: str, dtype, make_model, convert):
        sd = hub.read_safetensors([path], dtype=dtype, device=device, keep=lambda k: k.startswith(prefix))
        with _naming_keys(path, name, prefix):
            sd = convert({k[len(prefix) :]: x for k, x in sd.items()})
        return hub.build_with_weights(make_model, sd, f"{path} ({name})")

    unet = vae = text_encoder = tokenizer = None
    if "unet" in wanted:
        with _naming_keys(path, "U-Net", ldm.UNET_PREFIX):
            unet_cfg = ldm.infer_unet_config(u, upcast_attention=sd2 and prediction_type == "v_prediction")
        unet = build("U-Net", ldm.UNET_PREFIX, dtype, lambda: UNet(unet_cfg), lambda sd: ldm.unet_from_ldm(sd, unet_cfg))
    if "vae" in wanted:
        with _naming_keys(path, "VAE", ldm.VAE_PREFIX):
            vae_cfg = ldm.infer_vae_config(v)
        vae = build("VAE", ldm.VAE_PREFIX, vae_dtype, lambda: AutoencoderKL(vae_cfg), lambda sd: ldm.vae_from_ldm(sd, vae_cfg))
    if "text_encoder" in wanted:
        with _naming_keys(path, "text encoder", ldm.TEXT_PREFIX):
            text_cfg = ldm.infer_text_config(t)
        text_encoder = build(
            "text encoder", ldm.TEXT_PREFIX, dtype, lambda: CLIPTextEncoder(text_cfg),
            lambda sd: ldm.text_from_ldm(sd, text_cfg.layers),
        )  # fmt: skip
    if "tokenizer" in wanted:
        tokenizer = CLIPTokenizer.from_bpe(pad_token="!" if sd2 else "<|endoftext|>")
    schedule = NoiseSchedule.from_config({**SD_SCHEDULER, "prediction_type": prediction_type})
    return StableDiffusion(unet, vae, text_encoder, tokenizer, schedule, str(path), notes)


@contextlib.contextmanager
def _naming_keys(path: Path, part: str, prefix: str) -> Iterator[None]:
    """Inferring an architecture from, or renaming, a single file's tensors: a missing tensor
    (KeyError) or one of an impossible shape becomes a CheckpointError naming the file and key."""
    try:
        yield
    except KeyError as e:
        key = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise hub.CheckpointError(f"{path}: no tensor {prefix}{key}, needed for the {part}") from e
    except ldm.ShapeError as e:
        raise hub.CheckpointError(f"{path}: the {part} cannot be inferred: {e} (names under {prefix})") from e
    except (IndexError, ValueError, ZeroDivisionError, RuntimeError) as e:
        if isinstance(e, hub.CheckpointError):
            raise
        raise hub.CheckpointError(f"{path}: the {part} tensors ({prefix}*) have impossible shapes ({e})") from e
