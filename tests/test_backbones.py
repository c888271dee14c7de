"""The release's DINOv2 /14 -> /16 conversion (Rein's and QueryDiff's `convert_dinov2`): the patch
kernel and the position embedding resized bicubically, checked against a float64 bicubic written
out from Keys' kernel (a = -0.75, half-pixel centres, border clamped); ReinDINOv2 loading it
(needs timm, skipped without it)."""

import math

import numpy as np
import pytest
import torch

from unet_seg.backbones import release_patch16, resize_patch_kernel, resize_pos_embed

from .helpers import randn


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


def test_rein_dinov2_loads_the_14_weights_converted_as_the_release(monkeypatch):
    timm = pytest.importorskip("timm")  # the `recipes` extra; CI installs `.[test]` only
    from unet_seg.backbones import ReinDINOv2

    create, published = timm.create_model, {}

    def fake_create(name, pretrained=False, **kw):  # no download: random "published" /14 weights
        if pretrained:
            assert kw == {} and "patch14" in name  # the bicubic path asks for the /14 model as published
            torch.manual_seed(7)
            published["state"] = create(name, pretrained=False).state_dict()
            model = create(name, pretrained=False)
            model.load_state_dict(published["state"])
            return model
        return create(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", fake_create)
    backbone = ReinDINOv2(pretrained=True, img_size=64)
    state, w14 = backbone.vit.state_dict(), published["state"]["patch_embed.proj.weight"]
    torch.testing.assert_close(state["patch_embed.proj.weight"], resize_patch_kernel(w14, 16))
    torch.testing.assert_close(state["pos_embed"], resize_pos_embed(published["state"]["pos_embed"], (4, 4)))
    torch.testing.assert_close(state["blocks.3.mlp.fc1.weight"], published["state"]["blocks.3.mlp.fc1.weight"])
    with pytest.raises(ValueError, match="patch_resize"):
        ReinDINOv2(pretrained=False, img_size=64, patch_resize="nearest")
