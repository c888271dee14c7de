"""Original (LDM / CompVis / Stability) single-file checkpoints <-> our parameter names.

A single file holds the three networks under prefixes:

    model.diffusion_model.*   U-Net        first_stage_model.*   VAE
    cond_stage_model.*        text encoder (SD1: transformers CLIP under `transformer.`;
                              SD2: OpenCLIP under `model.`, attention packed as `in_proj_*`)

Each table maps one of our module prefixes to the original's; `to_ldm` and the `*_from_ldm`
functions use the same tables in both directions, so a conversion round-trips exactly.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .hub import clip_text_keys
from .models.clip import CLIPTextConfig
from .models.unet import UNetConfig
from .models.vae import VAEConfig

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def unet_blocks(cfg: UNetConfig) -> dict[str, tuple[str, dict]]:
    """Our U-Net module prefix -> (original prefix, renames of the parts inside it)."""
    n, levels = cfg.layers_per_block, len(cfg.channels)
    m = {
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "conv_in": ("input_blocks.0.0", {}),
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
    }
    for i in range(levels):
        for j in range(n):
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{1 + i * (n + 1) + j}.0", UNET_RESNET)
            if cfg.attention[i]:
                m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{1 + i * (n + 1) + j}.1", {})
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * (n + 1)}.0.op", {})
        has_attention = cfg.attention[levels - 1 - i]
        for j in range(n + 1):
            m[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{i * (n + 1) + j}.0", UNET_RESNET)
            if has_attention:
                m[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{i * (n + 1) + j}.1", {})
        if i < levels - 1:
            m[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{i * (n + 1) + n}.{1 + has_attention}.conv", {})
    return m


def vae_blocks(cfg: VAEConfig) -> dict[str, tuple[str, dict]]:
    """Our VAE module prefix -> (original prefix, renames of the parts inside it)."""
    levels = len(cfg.channels)
    m = {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", {})
        m[f"{part}.conv_out"] = (f"{part}.conv_out", {})
        m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        m[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", VAE_RESNET)
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION)
        m[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", VAE_RESNET)
    for i in range(levels):
        for j in range(cfg.layers_per_block):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
        for j in range(cfg.layers_per_block + 1):  # the original numbers decoder levels from the bottom
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{levels - 1 - i}.block.{j}", VAE_RESNET)
        if i < levels - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{levels - 1 - i}.upsample.conv", {})
    return m


def rename_to_ldm(keys, blocks: dict[str, tuple[str, dict]]) -> dict[str, str]:
    """Our key -> original key, for every key, through the block table (longest prefix wins)."""
    out = {}
    for key in keys:
        prefix = max((p for p in blocks if key.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            raise KeyError(f"no LDM name for parameter {key!r}")
        ldm_prefix, parts = blocks[prefix]
        rest = key[len(prefix) + 1 :]
        part = max((p for p in parts if rest.startswith(p + ".")), key=len, default=None)
        if part is not None:
            rest = parts[part] + rest[len(part) :]
        out[key] = f"{ldm_prefix}.{rest}"
    return out


def is_vae_attention_linear(key: str, t: Tensor) -> bool:
    """The original VAE mid-attention uses 1x1 convs where ours uses linears."""
    return ".mid_block.attentions.0.to_" in key and key.endswith("weight") and t.ndim in (2, 4)


def openclip_layer_names(layer: int) -> dict[str, str]:
    ours, orig = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
    return {ours + a + s: orig + b + s for a, b in OPENCLIP_LAYER.items() for s in (".weight", ".bias")}


def text_to_ldm(sd: dict[str, Tensor], openclip: bool) -> dict[str, Tensor]:
    """Our (transformers-named) CLIP text encoder -> original names, without the prefix."""
    if not openclip:
        return {f"transformer.{k}": v for k, v in sd.items()}
    out = {f"model.{OPENCLIP_TOP[k]}": sd[k] for k in OPENCLIP_TOP}
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    for i in range(layers):
        out.update({f"model.{b}": sd[a] for a, b in openclip_layer_names(i).items()})
        attn = f"text_model.encoder.layers.{i}.self_attn."
        for s in ("weight", "bias"):
            out[f"model.transformer.resblocks.{i}.attn.in_proj_{s}"] = torch.cat([sd[f"{attn}{p}_proj.{s}"] for p in "qkv"])
    return out


def text_from_ldm(sd: dict[str, Tensor], layers: int) -> dict[str, Tensor]:
    """Original text-encoder tensors (prefix stripped) -> our names, keeping the first `layers`
    layers (SD2 conditions on OpenCLIP's penultimate layer: 23 of its 24)."""
    if not any(k.startswith("model.") for k in sd):  # SD1: transformers CLIP
        return clip_text_keys({k.removeprefix("transformer."): v for k, v in sd.items() if k.startswith("transformer.")})
    out = {k: sd[f"model.{v}"] for k, v in OPENCLIP_TOP.items()}
    for i in range(layers):
        out.update({a: sd[f"model.{b}"] for a, b in openclip_layer_names(i).items()})
        attn = f"text_model.encoder.layers.{i}.self_attn."
        for s in ("weight", "bias"):
            for p, t in zip("qkv", sd[f"model.transformer.resblocks.{i}.attn.in_proj_{s}"].chunk(3)):
                out[f"{attn}{p}_proj.{s}"] = t
    return out


def split(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """(U-Net, VAE, text encoder) tensors with their prefixes stripped; everything else in an
    original checkpoint (EMA copies, the DDPM buffers `betas`, `alphas_cumprod`, ...) is ignored."""
    parts = ({}, {}, {})
    for key, t in sd.items():
        for part, prefix in zip(parts, (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)):
            if key.startswith(prefix):
                part[key[len(prefix) :]] = t
    return parts


def is_openclip(text: dict[str, Tensor]) -> bool:
    return "model.token_embedding.weight" in text


def indices(keys, pattern: str) -> list[int]:
    """The integers that fill `{}` in `pattern` among `keys`, sorted."""
    rx = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    return sorted({int(m.group(1)) for k in keys if (m := rx.fullmatch(k))})


class ShapeError(ValueError):
    """A tensor read to infer an architecture has the wrong number of dimensions."""

    def __init__(self, key: str, shape: torch.Size, ndim: int):
        super().__init__(f"tensor {key} has shape {list(shape)}, expected {ndim} dimensions")
        self.key = key


def _shape(sd: dict[str, Tensor], key: str, ndim: int) -> torch.Size:
    """The shape of `sd[key]`, which must have `ndim` dimensions (a KeyError names a missing one)."""
    shape = sd[key].shape
    if len(shape) != ndim:
        raise ShapeError(key, shape, ndim)
    return shape


def infer_unet_config(u: dict[str, Tensor], upcast_attention: bool = False) -> UNetConfig:
    """From original-layout U-Net tensor shapes. Head counts are not stored in weights: SD1
    (conv projections) uses 8 heads per level, SD2 (linear projections) 64-wide heads."""
    levels = 1 + len(indices(u, "input_blocks.{}.0.op.weight"))
    n = len(indices(u, "input_blocks.{}.0.in_layers.0.weight")) // levels
    first = [1 + i * (n + 1) for i in range(levels)]
    channels = tuple(_shape(u, f"input_blocks.{b}.0.out_layers.3.weight", 4)[0] for b in first)
    attention = tuple(f"input_blocks.{b}.1.proj_in.weight" in u for b in first)
    block = f"input_blocks.{first[attention.index(True)]}.1"
    linear_proj = u[f"{block}.proj_in.weight"].ndim == 2
    _shape(u, f"{block}.proj_in.weight", 2 if linear_proj else 4)
    return UNetConfig(
        in_channels=_shape(u, "input_blocks.0.0.weight", 4)[1],
        out_channels=_shape(u, "out.2.weight", 4)[0],
        channels=channels,
        attention=attention,
        heads=tuple(c // 64 if linear_proj else 8 for c in channels),
        layers_per_block=n,
        context_dim=_shape(u, f"{block}.transformer_blocks.0.attn2.to_k.weight", 2)[1],
        linear_proj=linear_proj,
        upcast_attention=upcast_attention,
    )


def infer_vae_config(v: dict[str, Tensor]) -> VAEConfig:
    """From original-layout VAE tensor shapes (scaling factor: SD 1.x/2.x's 0.18215)."""
    levels = len(indices(v, "encoder.down.{}.block.0.conv1.weight"))
    return VAEConfig(
        in_channels=_shape(v, "encoder.conv_in.weight", 4)[1],
        out_channels=_shape(v, "decoder.conv_out.weight", 4)[0],
        channels=tuple(_shape(v, f"encoder.down.{i}.block.0.conv2.weight", 4)[0] for i in range(levels)),
        layers_per_block=len(indices(v, "encoder.down.0.block.{}.conv1.weight")),
        latent_channels=_shape(v, "post_quant_conv.weight", 4)[0],
    )


def infer_text_config(t: dict[str, Tensor]) -> CLIPTextConfig:
    """From original-layout text-encoder shapes: SD1's CLIP ViT-L (quick GELU) or SD2's OpenCLIP
    ViT-H (GELU, penultimate layer: one layer fewer than stored). Heads are 64 wide in both."""
    if is_openclip(t):
        vocab, width = _shape(t, "model.token_embedding.weight", 2)
        return CLIPTextConfig(
            vocab_size=vocab,
            width=width,
            layers=len(indices(t, "model.transformer.resblocks.{}.ln_1.weight")) - 1,
            heads=width // 64,
            mlp_dim=_shape(t, "model.transformer.resblocks.0.mlp.c_fc.weight", 2)[0],
            max_positions=_shape(t, "model.positional_embedding", 2)[0],
            act="gelu",
        )
    ours = text_from_ldm(t, layers=0)  # SD1 stores transformers' layout (older files without `text_model.`)
    vocab, width = _shape(ours, "text_model.embeddings.token_embedding.weight", 2)
    return CLIPTextConfig(
        vocab_size=vocab,
        width=width,
        layers=len(indices(ours, "text_model.encoder.layers.{}.layer_norm1.weight")),
        heads=width // 64,
        mlp_dim=_shape(ours, "text_model.encoder.layers.0.mlp.fc1.weight", 2)[0],
        max_positions=_shape(ours, "text_model.embeddings.position_embedding.weight", 2)[0],
        act="quick_gelu",
    )


def unet_from_ldm(u: dict[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    names = rename_to_ldm(_unet_keys(cfg), unet_blocks(cfg))
    return {ours: u[orig] for ours, orig in names.items() if orig in u} | _unmapped(u, names)


def vae_from_ldm(v: dict[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    names = rename_to_ldm(_vae_keys(cfg), vae_blocks(cfg))
    out = {ours: v[orig] for ours, orig in names.items() if orig in v}
    out = {k: t.flatten(1) if is_vae_attention_linear(k, t) else t for k, t in out.items()}
    return out | _unmapped(v, names)


def to_ldm(unet: dict[str, Tensor], vae: dict[str, Tensor], text: dict[str, Tensor],
           unet_cfg: UNetConfig, vae_cfg: VAEConfig, openclip: bool) -> dict[str, Tensor]:  # fmt: skip
    """Our three state dicts -> one original-layout state dict, the text encoder as SD1's CLIP or
    (`openclip`) SD2's OpenCLIP. For OpenCLIP a last text layer of zeros is appended: originals
    store all 24 layers, SD conditions on the 23rd."""
    out = {UNET_PREFIX + k: unet[o] for o, k in rename_to_ldm(unet, unet_blocks(unet_cfg)).items()}
    for o, k in rename_to_ldm(vae, vae_blocks(vae_cfg)).items():
        t = vae[o]
        out[VAE_PREFIX + k] = t[:, :, None, None] if is_vae_attention_linear(o, t) else t
    text_ldm = text_to_ldm(text, openclip)
    if openclip:
        last = len(indices(text_ldm, "model.transformer.resblocks.{}.ln_1.weight"))
        for k, t in list(text_ldm.items()):
            if k.startswith("model.transformer.resblocks.0."):
                text_ldm[k.replace(".0.", f".{last}.", 1)] = torch.zeros_like(t)
    return out | {TEXT_PREFIX + k: t for k, t in text_ldm.items()}


def _unet_keys(cfg: UNetConfig) -> list[str]:
    from .models.unet import UNet

    with torch.device("meta"):
        return list(UNet(cfg).state_dict())


def _vae_keys(cfg: VAEConfig) -> list[str]:
    from .models.vae import AutoencoderKL

    with torch.device("meta"):
        return list(AutoencoderKL(cfg).state_dict())


def _unmapped(sd: dict[str, Tensor], names: dict[str, str]) -> dict[str, Tensor]:
    """Original keys no table entry reaches: kept as they are, so the loader names them as unexpected."""
    reached = set(names.values())
    return {k: t for k, t in sd.items() if k not in reached}
