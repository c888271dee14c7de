"""Prototype primitives against loops over pixels (float64), PANet's equations written out."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_seg.prototypes import cosine_logits, fg_bg_prototypes, mask_weights, masked_average_pool

from .helpers import randn


def pool_loop(feats, mask, ignore_index=255):
    """One [C, h, w] map and one [H, W] mask, H = s·h: the weight of feature pixel (y, x) is the
    share of its s×s block of mask pixels that are 1 (ignored ones count 0); Σ w f / Σ w."""
    c, h, w = feats.shape
    s = mask.shape[0] // h
    total, weight = torch.zeros(c, dtype=torch.float64), 0.0
    for y in range(h):
        for x in range(w):
            block = mask[y * s : (y + 1) * s, x * s : (x + 1) * s]
            wt = float(((block == 1) & (block != ignore_index)).sum()) / (s * s)
            total += wt * feats[:, y, x].double()
            weight += wt
    return total / weight if weight > 1e-6 else total * 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), h=st.integers(1, 5), s=st.sampled_from([1, 2, 4]), c=st.integers(1, 6), p=st.floats(0, 1))
def test_masked_average_pool_equals_the_loop_with_ignore_and_resizing(seed, h, s, c, p):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, c, h, h + 1, generator=g)
    u = torch.rand(2, h * s, (h + 1) * s, generator=g)
    mask = torch.where(u < p, 1, 0)
    mask = torch.where(u > 0.9, 255, mask)  # some ignore pixels
    got = masked_average_pool(feats, mask)
    for b in range(2):
        torch.testing.assert_close(got[b].double(), pool_loop(feats[b], mask[b]), rtol=1e-5, atol=1e-5)


def test_an_empty_mask_gives_a_zero_prototype_and_soft_masks_weigh_pixels():
    feats = randn(1, 3, 2, 2, seed=1)
    assert torch.equal(masked_average_pool(feats, torch.zeros(1, 4, 4, dtype=torch.long)), torch.zeros(1, 3))
    soft = torch.tensor([[[1.0, 0.0], [0.0, 0.5]]])
    expected = (feats[0, :, 0, 0] + 0.5 * feats[0, :, 1, 1]) / 1.5
    torch.testing.assert_close(masked_average_pool(feats, soft)[0], expected)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), shots=st.integers(1, 4))
def test_fg_bg_prototypes_average_the_shots_and_leave_ignore_pixels_out_of_both(seed, shots):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, shots, 5, 4, 4, generator=g)
    masks = torch.randint(0, 2, (2, shots, 8, 8), generator=g)
    masks[:, :, 0] = 255
    protos = fg_bg_prototypes(feats, masks)
    assert protos.shape == (2, 2, 5)
    for b in range(2):
        fg = torch.stack([pool_loop(feats[b, k], masks[b, k]) for k in range(shots)]).mean(0)
        bg_masks = torch.where(masks[b] == 255, 255, 1 - masks[b])
        bg = torch.stack([pool_loop(feats[b, k], bg_masks[k]) for k in range(shots)]).mean(0)
        torch.testing.assert_close(protos[b, 1].double(), fg, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(protos[b, 0].double(), bg, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), scale=st.floats(0.5, 30))
def test_cosine_logits_are_the_scaled_cosine_of_every_pixel_and_prototype(seed, scale):
    g = torch.Generator().manual_seed(seed)
    feats, protos = torch.randn(2, 6, 3, 2, generator=g), torch.randn(2, 3, 6, generator=g)
    got = cosine_logits(feats, protos, scale)
    for b in range(2):
        for j in range(3):
            for y in range(3):
                for x in range(2):
                    f, p = feats[b, :, y, x].double(), protos[b, j].double()
                    expected = scale * (f @ p) / (f.norm() * p.norm())
                    assert math.isclose(got[b, j, y, x].item(), expected.item(), rel_tol=1e-5, abs_tol=1e-5)
    # invariant to the features' and the prototypes' scale
    torch.testing.assert_close(cosine_logits(3 * feats, 0.5 * protos, scale), got)


def test_gradients_reach_features_and_dtype_is_kept():
    feats = randn(1, 2, 4, 3, 3, seed=2).double().requires_grad_()
    masks = torch.tensor([[[[1] * 6] * 3 + [[0] * 6] * 3] * 2])
    query = randn(1, 4, 3, 3, seed=3).double().requires_grad_()
    logits = cosine_logits(query, fg_bg_prototypes(feats, masks))
    assert logits.dtype == torch.float64
    logits.sum().backward()
    assert feats.grad.abs().sum() > 0 and query.grad.abs().sum() > 0


def test_bad_shapes_and_float_masks_are_refused():
    with pytest.raises(ValueError, match="leading dims"):
        masked_average_pool(randn(2, 3, 4, 4), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, S, C, h, w\]"):
        fg_bg_prototypes(randn(2, 3, 4, 4), torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="integer labels"):
        fg_bg_prototypes(randn(2, 1, 3, 4, 4), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"prototypes \[B, P, C\]"):
        cosine_logits(randn(2, 3, 4, 4), randn(2, 2, 4))
    assert mask_weights(torch.ones(2, 8, 8, dtype=torch.long), (4, 4)).shape == (2, 4, 4)
