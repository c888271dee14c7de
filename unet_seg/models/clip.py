"""The CLIP text transformer that conditions Stable Diffusion's U-Net.

    text_encoder(ids) -> context      ids [B, L] int, L <= 77  ->  [B, L, width]

Pre-LayerNorm transformer with a causal mask; the output is the final LayerNorm of the last
layer, i.e. transformers' `CLIPTextModel(...).last_hidden_state`. SD1 uses CLIP ViT-L/14's
text tower (quick GELU, 12 layers). SD2 uses OpenCLIP ViT-H's, conditioned on its penultimate
layer: diffusers ships those checkpoints with 23 of the 24 layers, followed by the final norm.

Parameter names are those of the published SD `text_encoder/model.safetensors` files
(`text_model.embeddings.token_embedding.weight`, ...), which load with no renaming. Two
variants need a fix-up on loading: files written by transformers before 4.31 also hold
`text_model.embeddings.position_ids` (positions here are computed, not stored: drop it), and
transformers >= 5 saves without the `text_model.` prefix (it re-adds it when loading).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import capturing


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    max_positions: int = 77
    act: str = "quick_gelu"  # "quick_gelu" (x·σ(1.702x), OpenAI CLIP) or "gelu" (erf GELU, OpenCLIP)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"act must be 'quick_gelu' or 'gelu', got {self.act!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        sizes = (self.vocab_size, self.width, self.layers, self.heads, self.mlp_dim, self.max_positions)
        if min(sizes) < 1:
            raise ValueError(f"sizes must be positive, got {self}")


SD1_TEXT = CLIPTextConfig()  # CLIP ViT-L/14
SD2_TEXT = CLIPTextConfig(width=1024, layers=23, heads=16, mlp_dim=4096, act="gelu")  # OpenCLIP ViT-H, 23 of 24 layers
TINY_SD1_TEXT = replace(SD1_TEXT, width=32, layers=2, heads=2, mlp_dim=64)  # full vocabulary: real token ids work
TINY_SD2_TEXT = replace(SD2_TEXT, width=48, layers=3, heads=3, mlp_dim=96)


class SelfAttention(nn.Module):
    """CLIP's multi-head self-attention; causal for the text tower. `cfg`: any config with
    width, heads (the text and vision configs)."""

    def __init__(self, cfg, causal: bool):
        super().__init__()
        self.heads, self.causal = cfg.heads, causal
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, D] -> [B, L, D]; if causal, position i attends to positions <= i."""
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg):  # width, mlp_dim, act
        super().__init__()
        self.quick_gelu = cfg.act == "quick_gelu"
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer of both CLIP towers. `cfg`: width, heads, mlp_dim, act, layer_norm_eps."""

    def __init__(self, cfg, causal: bool):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig = SD1_TEXT):
        super().__init__()
        self.config = cfg
        # Containers only, so that parameter names match transformers' `text_model.*` layout.
        self.text_model = nn.ModuleDict(
            dict(
                embeddings=nn.ModuleDict(
                    dict(
                        token_embedding=nn.Embedding(cfg.vocab_size, cfg.width),
                        position_embedding=nn.Embedding(cfg.max_positions, cfg.width),
                    )
                ),
                encoder=nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(cfg, causal=True) for _ in range(cfg.layers)))),
                final_layer_norm=nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps),
            )
        )

    def forward(self, ids: Tensor) -> Tensor:
        """Token ids [B, L] (int64 or int32, L <= max_positions) -> final-norm hidden states
        [B, L, width] in the parameters' dtype."""
        self._check(ids)
        tm = self.text_model
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding(positions)
        for layer in tm.encoder.layers:
            x = layer(x)
        return tm.final_layer_norm(x)

    def _check(self, ids: Tensor) -> None:
        cfg = self.config
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be int64 or int32 token ids, got {ids.dtype}")
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= cfg.max_positions:
            raise ValueError(f"ids must be [B, L] with 1 <= L <= {cfg.max_positions}, got shape {tuple(ids.shape)}")
        # A value check needs the ids on the host; under torch.compile and while a CUDA graph is
        # captured (which a host sync would break; its warm-up calls check) it is left to the embedding.
        if not torch.compiler.is_compiling() and not capturing(ids) and ids.numel():
            lo, hi = (int(v) for v in ids.aminmax())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"ids must lie in [0, {cfg.vocab_size}), got values in [{lo}, {hi}]")


class CLIPTextEncoderWithProjection(CLIPTextEncoder):
    """transformers' `CLIPTextModelWithProjection`: the text tower and `text_projection` into CLIP's
    joint image-text space (DiGSeg's class embeddings t_c, with CLIP ViT-L/14's text tower).

        encoder.text_embeds(ids) -> [B, projection_dim]   final-norm state at the first EOS token,
                                                          projected (not L2-normalised)
    `encoder(ids)` is still the per-token state [B, L, width]. Load a full CLIP checkpoint with
    `unet_seg.pretrained.load_clip`.
    """

    def __init__(self, cfg: CLIPTextConfig = SD1_TEXT, projection_dim: int = 768, eos_token_id: int = 49407):
        super().__init__(cfg)
        self.eos_token_id = eos_token_id
        self.text_projection = nn.Linear(cfg.width, projection_dim, bias=False)

    def text_embeds(self, ids: Tensor) -> Tensor:
        """Token ids [B, L] holding an EOS each -> [B, projection_dim]. The first EOS is where
        transformers pools (its `argmax(ids)` for OpenAI CLIP's config, EOS being the largest id)."""
        hidden = self(ids)
        is_eos = ids == self.eos_token_id
        if not torch.compiler.is_compiling() and not bool(is_eos.any(1).all()):
            raise ValueError(f"every row of ids needs an EOS token ({self.eos_token_id}) to pool at")
        first = is_eos.int().argmax(1)
        return self.text_projection(hidden[torch.arange(ids.shape[0], device=ids.device), first])
