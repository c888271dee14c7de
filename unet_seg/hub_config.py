"""The hub layouts' `config.json` (diffusers, transformers) <-> our config dataclasses.

    unet_from_diffusers(d)      -> UNetConfig         unet_to_diffusers(cfg)      -> kwargs of diffusers' UNet2DConditionModel
    vae_from_diffusers(d)       -> VAEConfig          vae_to_diffusers(cfg)       -> kwargs of diffusers' AutoencoderKL
    text_from_transformers(d)   -> CLIPTextConfig     text_to_transformers(cfg)   -> kwargs of transformers' CLIPTextConfig
    vision_from_transformers(d) -> CLIPVisionConfig   vision_to_transformers(cfg) -> kwargs of transformers' CLIPVisionConfig

Reading refuses settings the models here do not implement (with the key and the value SD uses);
missing keys take the reference library's defaults. `to_hub(cfg)` is the config.json that
`unet_seg.pretrained.save_pretrained` writes, naming the reference library's model class. The
weights' key layouts: `hub.py` (diffusers folders), `ldm.py` (single files). The models import
nothing from here: this module (and `hub`, `pretrained`, `sd`, `ldm`) depends on them, never back.
"""

from __future__ import annotations

from typing import Any

from .models.clip import CLIPTextConfig
from .models.clip_vision import CLIPVisionConfig
from .models.unet import UNetConfig
from .models.vae import VAEConfig

# ---------------------------------------------------------------- U-Net (diffusers)

_DOWN_KINDS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attention
_UP_KINDS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_UNET_FIXED = {  # diffusers settings whose SD value is the only one implemented here
    "act_fn": "silu",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": 1,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "num_class_embeds": None,
    "mid_block_only_cross_attention": None,
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}


def unet_from_diffusers(d: dict) -> UNetConfig:
    """From a diffusers `unet/config.json` dict; settings SD does not use are refused."""
    for key, default in _UNET_FIXED.items():
        if d.get(key, default) != default:
            raise ValueError(f"unsupported U-Net setting {key}={d[key]!r} (SD 1.x/2.x use {default!r})")
    down, up = d.get("down_block_types", _SD_DOWN), d.get("up_block_types", _SD_UP)
    if any(t not in _DOWN_KINDS for t in down) or [_UP_KINDS.get(t) for t in up[::-1]] != [_DOWN_KINDS[t] for t in down]:
        raise ValueError(f"unsupported block layout: down {down}, up {up}")
    n = len(down)
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)  # SD1's "head dim" is the head count
    channels = tuple(d.get("block_out_channels", UNetConfig.channels))
    if len(channels) != n:
        raise ValueError(f"block_out_channels {channels} and down_block_types {down} differ in length")
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        channels=channels,
        attention=tuple(_DOWN_KINDS[t] for t in down),
        heads=tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n,
        layers_per_block=d.get("layers_per_block", 2),
        context_dim=d.get("cross_attention_dim", 768),
        linear_proj=d.get("use_linear_projection", False),
        upcast_attention=d.get("upcast_attention", False) or False,
        norm_groups=d.get("norm_num_groups", 32),
        norm_eps=d.get("norm_eps", 1e-5),
        support_in_channels=d.get("support_in_channels", 0),
    )


def unet_to_diffusers(cfg: UNetConfig) -> dict:
    """Keyword arguments of diffusers' `UNet2DConditionModel` for the same network."""
    down = [k for a in cfg.attention for k, v in _DOWN_KINDS.items() if v == a]
    up = [k for a in cfg.attention[::-1] for k, v in _UP_KINDS.items() if v == a]
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=list(cfg.channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=list(cfg.heads),
        cross_attention_dim=cfg.context_dim,
        use_linear_projection=cfg.linear_proj,
        upcast_attention=cfg.upcast_attention,
        norm_num_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps,
    )


# ---------------------------------------------------------------- VAE (diffusers)


def vae_from_diffusers(d: dict) -> VAEConfig:
    """From a diffusers `vae/config.json` dict; settings SD does not use are refused."""
    n = len(d.get("block_out_channels", VAEConfig.channels))
    fixed = {
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "act_fn": "silu",
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }
    for key, default in fixed.items():
        value = d.get(key, default)
        if (list(value) if isinstance(value, (list, tuple)) else value) != default:
            raise ValueError(f"unsupported VAE setting {key}={value!r} (SD 1.x/2.x use {default!r})")
    return VAEConfig(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        channels=tuple(d.get("block_out_channels", VAEConfig.channels)),
        layers_per_block=d.get("layers_per_block", 2),
        latent_channels=d.get("latent_channels", 4),
        norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=d.get("scaling_factor", 0.18215),
    )


def vae_to_diffusers(cfg: VAEConfig) -> dict:
    """Keyword arguments of diffusers' `AutoencoderKL` for the same network."""
    n = len(cfg.channels)
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(cfg.channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        scaling_factor=cfg.scaling_factor,
    )


# ---------------------------------------------------------------- CLIP towers (transformers)


def text_from_transformers(d: dict) -> CLIPTextConfig:
    """From a transformers `CLIPTextConfig` dict (a `text_encoder/config.json`); missing keys
    take transformers' defaults, settings this model does not implement are refused."""
    if d.get("model_type", "clip_text_model") != "clip_text_model":
        raise ValueError(f"model_type must be 'clip_text_model', got {d['model_type']!r}")
    if d.get("architectures") not in (None, ["CLIPTextModel"]):
        raise ValueError(f"architectures must be ['CLIPTextModel'], got {d['architectures']!r}")
    for key in ("attention_dropout", "dropout"):
        if d.get(key, 0.0):
            raise ValueError(f"{key}={d[key]!r} is not implemented (SD's text encoders use 0.0)")
    return CLIPTextConfig(
        vocab_size=d.get("vocab_size", 49408),
        width=d.get("hidden_size", 512),
        layers=d.get("num_hidden_layers", 12),
        heads=d.get("num_attention_heads", 8),
        mlp_dim=d.get("intermediate_size", 2048),
        max_positions=d.get("max_position_embeddings", 77),
        act=d.get("hidden_act", "quick_gelu"),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
    )


def text_to_transformers(cfg: CLIPTextConfig) -> dict:
    """Keyword arguments of transformers' `CLIPTextConfig` for the same network."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_dim,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.act,
        layer_norm_eps=cfg.layer_norm_eps,
    )


def vision_from_transformers(d: dict) -> CLIPVisionConfig:
    """From a transformers `CLIPVisionConfig` dict (an image encoder's `config.json`, or the
    `vision_config` of a full CLIP config with its top-level `projection_dim`); missing keys take
    transformers' defaults, settings this model does not implement are refused."""
    if d.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"model_type must be 'clip_vision_model', got {d['model_type']!r}")
    if d.get("architectures") not in (None, ["CLIPVisionModelWithProjection"]):
        raise ValueError(f"architectures must be ['CLIPVisionModelWithProjection'], got {d['architectures']!r}")
    if d.get("num_channels", 3) != 3:
        raise ValueError(f"num_channels must be 3 (RGB), got {d['num_channels']!r}")
    if d.get("attention_dropout", 0.0):
        raise ValueError(f"attention_dropout={d['attention_dropout']!r} is not implemented (CLIP uses 0.0)")
    return CLIPVisionConfig(
        image_size=d.get("image_size", 224),
        patch_size=d.get("patch_size", 32),
        width=d.get("hidden_size", 768),
        layers=d.get("num_hidden_layers", 12),
        heads=d.get("num_attention_heads", 12),
        mlp_dim=d.get("intermediate_size", 3072),
        projection_dim=d.get("projection_dim", 512),
        act=d.get("hidden_act", "quick_gelu"),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
    )


def vision_to_transformers(cfg: CLIPVisionConfig) -> dict:
    """Keyword arguments of transformers' `CLIPVisionConfig` for the same network."""
    return dict(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_dim,
        projection_dim=cfg.projection_dim,
        hidden_act=cfg.act,
        layer_norm_eps=cfg.layer_norm_eps,
    )


# ---------------------------------------------------------------- what save_pretrained writes


def to_hub(cfg: Any) -> dict:
    """The component's config.json for `cfg`, naming the reference library's model class."""
    if isinstance(cfg, UNetConfig):
        support = {"support_in_channels": cfg.support_in_channels} if cfg.support_in_channels else {}  # diffusers ignores it
        return {"_class_name": "UNet2DConditionModel", **unet_to_diffusers(cfg), **support}
    if isinstance(cfg, VAEConfig):
        return {"_class_name": "AutoencoderKL", **vae_to_diffusers(cfg)}
    if isinstance(cfg, CLIPTextConfig):
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **text_to_transformers(cfg)}
    raise TypeError(f"no hub config.json format for {type(cfg).__name__}")
