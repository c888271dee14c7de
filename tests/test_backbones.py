"""DINOv2 in plain PyTorch against transformers' `Dinov2Model` on the same timm-layout weights;
the release's /14 -> /16 conversion (Rein's and QueryDiff's `convert_dinov2`): the patch kernel and
the position embedding resized bicubically, checked against a float64 bicubic written out from
Keys' kernel (a = -0.75, half-pixel centres, border clamped); timm's FlexiViT conversion by the
property that defines it; ReinDINOv2 loading a timm hub checkpoint both ways."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from unet_seg.backbones import (
    DINOV2_HUB, DINOV2_L14, TINY_DINOV2, DINOv2, ReinDINOv2, flexivit_patch16, load_dinov2, release_patch16, resize_patch_kernel,
    resize_patch_kernel_pinv, resize_pos_embed,
)  # fmt: skip
from unet_seg.errors import CheckpointError

from .helpers import fake_hub_cache, rand, randn, rel_err, write_tiny_dinov2


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in]: output sample i = Σ_j M[i, j] · input j."""
    def keys(d):
        d = abs(d)
        return (a + 2) * d**3 - (a + 3) * d**2 + 1 if d <= 1 else (a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a if d < 2 else 0.0)

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        x0 = math.floor(x)
        for k in range(-1, 3):
            m[i, min(max(x0 + k, 0), n_in - 1)] += keys(x - (x0 + k))
    return m


def test_patch_kernel_equals_the_written_out_bicubic_14_to_16():
    w = randn(6, 3, 14, 14, seed=1).double()
    m = bicubic_matrix(14, 16)
    expected = torch.from_numpy(np.einsum("ij,cdjk,lk->cdil", m, w.numpy(), m))
    got = resize_patch_kernel(w, 16)
    assert got.shape == (6, 3, 16, 16) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)  # measured 8.9e-16
    torch.testing.assert_close(resize_patch_kernel(w.float(), 16).double(), expected, rtol=0, atol=2e-6)  # float32: 4.4e-7


def test_patch_kernel_keeps_values_so_the_summed_response_grows_by_the_area():
    # a constant kernel stays constant (each bicubic row sums to 1): its response to a flat patch grows
    # by (16/14)²; FlexiViT's pseudo-inverse resize would keep it (timm's patch_size=16)
    w = torch.full((2, 3, 14, 14), 0.25)
    got = resize_patch_kernel(w, 16)
    torch.testing.assert_close(got, torch.full((2, 3, 16, 16), 0.25))
    assert got.sum().item() / w.sum().item() == pytest.approx((16 / 14) ** 2)


def test_pos_embed_keeps_the_class_token_and_equals_the_written_out_bicubic_37_to_32():
    pos = randn(1, 1 + 37 * 37, 5, seed=2).double()
    got = resize_pos_embed(pos, (32, 24))
    assert got.shape == (1, 1 + 32 * 24, 5)
    torch.testing.assert_close(got[:, :1], pos[:, :1])
    grid = pos[0, 1:].numpy().reshape(37, 37, 5)
    expected = torch.from_numpy(np.einsum("ij,jkc,lk->ilc", bicubic_matrix(37, 32), grid, bicubic_matrix(37, 24)).reshape(32 * 24, 5))
    torch.testing.assert_close(got[0, 1:], expected, rtol=0, atol=1e-12)  # measured 2.9e-14
    torch.testing.assert_close(resize_pos_embed(pos.float(), (32, 24))[0, 1:].double(), expected, rtol=0, atol=3e-5)  # float32: 1.0e-5
    with pytest.raises(ValueError, match="square grid"):
        resize_pos_embed(pos[:, :-1], (4, 4))


def test_release_conversion_changes_only_the_patch_kernel_and_position_embedding():
    state = {"patch_embed.proj.weight": randn(4, 3, 14, 14, seed=3), "pos_embed": randn(1, 1 + 9, 4, seed=4), "blocks.0.w": randn(3, seed=5)}
    out = release_patch16(state, (2, 2))
    assert out["patch_embed.proj.weight"].shape == (4, 3, 16, 16) and out["pos_embed"].shape == (1, 5, 4)
    assert out["blocks.0.w"] is state["blocks.0.w"] and state["patch_embed.proj.weight"].shape[-1] == 14


def test_pinv_kernel_keeps_every_patchs_response_with_the_least_norm():
    # FlexiViT: <w16, resize(x)> = <w14, x> for every 14×14 patch x (resize: antialiased bicubic);
    # among those kernels the least-norm one, here from an SVD least-squares solve
    w = randn(4, 3, 14, 14, seed=6).double()
    got = resize_patch_kernel_pinv(w, 16)
    x = randn(5, 3, 14, 14, seed=7).double()
    x16 = torch.nn.functional.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(torch.einsum("cdij,ndij->nc", got, x16), torch.einsum("cdij,ndij->nc", w, x), rtol=0, atol=1e-10)  # measured 1.9e-13 (responses up to ~40)
    basis = torch.eye(196, dtype=torch.float64).view(196, 1, 14, 14)
    rt = torch.nn.functional.interpolate(basis, size=(16, 16), mode="bicubic", align_corners=False, antialias=True).view(196, 256)  # Rᵀ
    least = torch.from_numpy(np.linalg.lstsq(rt.numpy(), w.reshape(12, 196).T.numpy(), rcond=None)[0]).T.reshape(4, 3, 16, 16)
    torch.testing.assert_close(got, least, rtol=0, atol=1e-10)  # measured 2.3e-14
    assert resize_patch_kernel_pinv(w.float(), 16).dtype == torch.float32


def timm_to_transformers(state: dict, layers: int) -> dict:
    """timm's DINOv2 names -> transformers' `Dinov2Model` names (qkv split into q, k, v)."""
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}  # fmt: skip
    for i in range(layers):
        t, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            out |= {h + part + ".weight": state[t + part + ".weight"], h + part + ".bias": state[t + part + ".bias"]}
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), state[t + "attn.qkv.weight"].chunk(3), state[t + "attn.qkv.bias"].chunk(3)):
            out |= {h + f"attention.{name}.weight": w, h + f"attention.{name}.bias": b}
        out |= {h + "attention.o_proj.weight": state[t + "attn.proj.weight"], h + "attention.o_proj.bias": state[t + "attn.proj.bias"],
                h + "layer_scale1.lambda1": state[t + "ls1.gamma"], h + "layer_scale2.lambda1": state[t + "ls2.gamma"]}  # fmt: skip
    return out


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_dinov2_equals_transformers_dinov2_on_a_timm_checkpoint(tmp_path, dtype, bound):
    transformers = pytest.importorskip("transformers")
    folder = write_tiny_dinov2(tmp_path / "dinov2", width=64, heads=4, layers=3, grid=4)
    cfg, state = load_dinov2(folder)
    assert cfg == replace(DINOV2_L14, width=64, heads=4, layers=3, image_size=56)
    ours = DINOv2(cfg).to(dtype)
    ours.load_state_dict(state)
    hf_cfg = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256, image_size=56, patch_size=14)
    theirs = transformers.Dinov2Model(hf_cfg).to(dtype).eval()
    missing, unexpected = theirs.load_state_dict(timm_to_transformers(state, 3), strict=False)
    assert missing == ["embeddings.mask_token"] and unexpected == []
    x = randn(2, 3, 56, 56, seed=8).to(dtype)
    with torch.no_grad():
        ref = theirs(pixel_values=x, output_hidden_states=True)
        t = ours.embed(x)
        errors = [rel_err(t, ref.hidden_states[0])]
        for block, expected in zip(ours.blocks, ref.hidden_states[1:]):
            t = block(t)
            errors.append(rel_err(t, expected))
        errors.append(rel_err(ours(x), ref.last_hidden_state))
    assert max(errors) <= bound, errors  # measured float32 0.0 (the same kernels), float64 2.2e-16


def test_dinov2_resamples_its_position_embedding_for_other_grids_as_timm():
    cfg = replace(TINY_DINOV2, layers=1, image_size=56)  # a 4 × 4 grid; input 84 px: 6 × 6
    vit = DINOv2(cfg)
    x = randn(1, 3, 84, 84, seed=9)
    patches = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    pos = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=True).flatten(2).transpose(1, 2)
    expected = torch.cat([vit.cls_token + vit.pos_embed[:, :1], patches + pos], dim=1)
    torch.testing.assert_close(vit.embed(x), expected, rtol=0, atol=1e-6)


def test_rein_dinov2_loads_the_hub_14_weights_converted_as_the_release_or_as_timm(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    folder = write_tiny_dinov2(tmp_path / "dinov2")
    fake_hub_cache(tmp_path / "cache", DINOV2_HUB, {"config.json": folder / "config.json", "model.safetensors": folder / "model.safetensors"})
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _, published = load_dinov2(folder)
    release = ReinDINOv2(img_size=64, tokens=4)  # the default: DINOV2_HUB, from the (offline) hub cache
    timm_like = ReinDINOv2(folder, img_size=64, tokens=4, patch_resize="pinv")
    for backbone, convert in ((release, release_patch16), (timm_like, flexivit_patch16)):
        state, expected = backbone.vit.state_dict(), convert(published, (4, 4))
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
        assert not any(p.requires_grad for p in backbone.vit.parameters()) and backbone.channels == (32,) * 4
    torch.testing.assert_close(release.vit.state_dict()["pos_embed"], resize_pos_embed(published["pos_embed"], (4, 4)))
    maps = release(rand(1, 3, 64, 64, seed=10) * 2 - 1)
    assert [tuple(m.shape) for m in maps] == [(1, 32, 16, 16), (1, 32, 8, 8), (1, 32, 4, 4), (1, 32, 2, 2)]
    with pytest.raises(ValueError, match="patch_resize"):
        ReinDINOv2(None, img_size=64, patch_resize="nearest", config=TINY_DINOV2)


def test_load_dinov2_names_what_does_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_tiny_dinov2(tmp_path / "dinov2", layers=2, grid=2)
    state = load_file(str(folder / "model.safetensors"))
    del state["blocks.1.ls2.gamma"]
    save_file(state | {"blocks.1.attn.q_norm.weight": torch.ones(32)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(1\).*blocks.1.ls2.gamma.*unexpected keys \(1\).*q_norm"):
        load_dinov2(folder)
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_giant_patch14_dinov2"}))
    with pytest.raises(CheckpointError, match="vit_giant_patch14_dinov2.*not one of"):
        load_dinov2(folder)
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_dinov2(tmp_path)
