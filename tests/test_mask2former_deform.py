"""ms_deform_attn against an independent implementation (explicit bilinear interpolation by
index arithmetic, no grid_sample) in float64: values and gradients of value, locations and
weights; properties of the sampling; the MSDeformAttn layer."""

import math

import pytest
import torch
from hypothesis import given, settings
from torch import nn
import torch.nn.functional as F
from hypothesis import strategies as st

from unet_seg.mask2former import MSDeformAttn, ms_deform_attn
from unet_seg.mask2former.deform import reference_points

from .helpers import randn


def bilinear_reference(value, sizes, loc, weights):
    """Per level and sampling point: the four neighbouring pixel centres, weights (1-fx)(1-fy) ...,
    corners outside the map contribute nothing. value [B, S, M, D] -> [B, Q, M·D]."""
    b, _, m, d = value.shape
    q = loc.shape[1]
    out = value.new_zeros(b, q, m, d)
    start = 0
    for level, (h, w) in enumerate(sizes):
        v = value[:, start:start + h * w]  # [B, h·w, M, D]
        start += h * w
        for p in range(loc.shape[4]):
            x = loc[:, :, :, level, p, 0] * w - 0.5  # pixel coordinates, centre of pixel i at i
            y = loc[:, :, :, level, p, 1] * h - 0.5
            x0, y0 = x.floor(), y.floor()
            fx, fy = x - x0, y - y0
            for dx, dy, corner_w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
                xi, yi = (x0 + dx).long(), (y0 + dy).long()
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1))  # [B, Q, M]
                picked = torch.stack([v[i, index[i], torch.arange(m)[None, :].expand(q, m)] for i in range(b)])  # [B, Q, M, D]
                out = out + (weights[:, :, :, level, p] * corner_w * inside)[..., None] * picked
    return out.reshape(b, q, m * d)


def _inputs(b=2, q=5, m=2, d=3, sizes=((4, 5), (2, 3), (1, 1)), p=3, seed=0, spread=0.2):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in sizes)
    value = torch.randn(b, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(b, q, m, len(sizes), p, 2, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread  # some outside
    weights = torch.rand(b, q, m, len(sizes), p, generator=g, dtype=torch.float64)
    return value, sizes, loc, weights


@pytest.mark.parametrize("seed", range(3))
def test_matches_the_explicit_bilinear_reference_in_values_and_gradients(seed):
    value, sizes, loc, weights = _inputs(seed=seed)
    ours_in = [t.clone().requires_grad_() for t in (value, loc, weights)]
    ref_in = [t.clone().requires_grad_() for t in (value, loc, weights)]
    ours = ms_deform_attn(ours_in[0], torch.tensor(sizes), ours_in[1], ours_in[2])
    ref = bilinear_reference(ref_in[0], sizes, ref_in[1], ref_in[2])
    assert ours.shape == (2, 5, 2 * 3)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for name, a, r in zip(("value", "sampling_locations", "attention_weights"), ours_in, ref_in):
        assert a.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, r.grad, rtol=0, atol=1e-6, msg=name)


def test_gradcheck_in_all_three_inputs():
    value, sizes, loc, weights = _inputs(b=1, q=2, m=2, d=2, sizes=((3, 4), (2, 2)), p=2, spread=0.1)
    inputs = tuple(t.requires_grad_() for t in (value, loc, weights))
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, sizes, l, a), inputs)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), m=st.integers(1, 3), d=st.integers(1, 4), p=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_constant_map_gives_the_weights_of_the_points_far_inside(h, w, m, d, p, seed):
    # Bilinear interpolation of a constant c is c wherever all four neighbours are inside: at
    # locations between the first and the last pixel centre.
    g = torch.Generator().manual_seed(seed)
    value = torch.full((1, h * w, m, d), 2.5, dtype=torch.float64)
    lo = torch.tensor([0.5 / w, 0.5 / h], dtype=torch.float64)
    hi = torch.tensor([1 - 0.5 / w, 1 - 0.5 / h], dtype=torch.float64)
    loc = lo + (hi - lo) * torch.rand(1, 3, m, 1, p, 2, generator=g, dtype=torch.float64)
    weights = torch.rand(1, 3, m, 1, p, generator=g, dtype=torch.float64)
    out = ms_deform_attn(value, [(h, w)], loc, weights).view(1, 3, m, d)
    torch.testing.assert_close(out, 2.5 * weights.sum(-1).sum(-1)[..., None].expand(-1, -1, -1, d))


def test_points_outside_every_map_give_zero_and_weights_act_linearly():
    value, sizes, loc, weights = _inputs()
    far = loc.clone()
    far[..., 0] = 1.0 + 1.0 / 1  # more than one pixel right of every map (widest has 5 pixels)
    assert ms_deform_attn(value, sizes, far, weights).abs().max() == 0
    a = ms_deform_attn(value, sizes, loc, weights)
    b = ms_deform_attn(value, sizes, loc, 3 * weights)
    torch.testing.assert_close(b, 3 * a)


def test_pixel_centres_return_the_pixel_values():
    value, sizes, _, _ = _inputs(b=1, m=1, sizes=((3, 4),))
    ref = reference_points(sizes, dtype=torch.float64)  # [12, 2]
    loc = ref[None, :, None, None, None, :]  # one point per query at its own pixel centre
    out = ms_deform_attn(value, sizes, loc, torch.ones(1, 12, 1, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(out, value[:, :, 0])


def test_bad_shapes_are_refused_with_the_expected_shape():
    value, sizes, loc, weights = _inputs()
    with pytest.raises(ValueError, match="positions"):
        ms_deform_attn(value[:, 1:], sizes, loc, weights)
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn(value, sizes, loc[..., :1], weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, sizes, loc, weights[..., :1])


def test_layer_shapes_init_and_gradients():
    torch.manual_seed(0)
    layer = MSDeformAttn(dim=16, levels=2, heads=4, points=3)
    sizes = [(4, 4), (2, 2)]
    tokens = torch.randn(2, 20, 16, requires_grad=True)
    ref = reference_points(sizes).expand(2, -1, -1)
    out = layer(tokens, ref, tokens, sizes)
    assert out.shape == (2, 20, 16)
    # Deformable DETR's init: head m's offsets point in direction 2πm/heads, radius p + 1 pixels
    bias = layer.sampling_offsets.bias.view(4, 2, 3, 2)
    torch.testing.assert_close(bias[1, 0, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[0, 1, 0], torch.tensor([1.0, 0.0]))
    assert math.isclose(bias[2, 0, 1, 0].item(), -2.0, abs_tol=1e-6)
    out.square().sum().backward()
    assert tokens.grad.abs().sum() > 0
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_compiles_without_graph_breaks():
    # fullgraph=True raises on any graph break; the eager backend keeps the test fast on CPU.
    value, sizes, loc, weights = _inputs()
    compiled = torch.compile(lambda v, l, a: ms_deform_attn(v, sizes, l, a), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(value, loc, weights), ms_deform_attn(value, sizes, loc, weights))
    layer = MSDeformAttn(dim=16, levels=2, heads=4, points=3)
    sizes = [(4, 4), (2, 2)]
    tokens, ref = randn(1, 20, 16, seed=12), reference_points(sizes)[None]
    compiled_layer = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled_layer(tokens, ref, tokens, sizes), layer(tokens, ref, tokens, sizes))


# ------------------------------------------------------------------ non-square maps, written out

NON_SQUARE = ((13, 7), (6, 11), (3, 5))  # (H, W) per level: a swapped H and W shows on every one


def per_point_reference(value, sizes, loc, weights):
    """Deformable DETR's sampling as plain loops over batch, query, head, level and point: the
    point (x, y) in [0, 1] sits at pixel coordinates (x·W − ½, y·H − ½) (pixel (i, j) has its centre
    at (j + ½)/W, (i + ½)/H); the four surrounding pixels are read by row-major index
    start_l + i·W + j, weighted bilinearly, those outside the map read as 0. float64 Python scalars."""
    b, _, m, d = value.shape
    q, n_points = loc.shape[1], loc.shape[4]
    out = torch.zeros(b, q, m, d, dtype=torch.float64)
    starts = [sum(h * w for h, w in sizes[:level]) for level in range(len(sizes))]
    for bi in range(b):
        for qi in range(q):
            for mi in range(m):
                for level, (h, w) in enumerate(sizes):
                    for pi in range(n_points):
                        x = loc[bi, qi, mi, level, pi, 0].item() * w - 0.5
                        y = loc[bi, qi, mi, level, pi, 1].item() * h - 0.5
                        j0, i0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(d, dtype=torch.float64)
                        for i in (i0, i0 + 1):
                            for j in (j0, j0 + 1):
                                if 0 <= i < h and 0 <= j < w:
                                    corner = (1 - abs(x - j)) * (1 - abs(y - i))
                                    sample += corner * value[bi, starts[level] + i * w + j, mi].double()
                        out[bi, qi, mi] += weights[bi, qi, mi, level, pi].item() * sample
    return out.reshape(b, q, m * d)


def test_sampling_equals_the_per_point_loop_on_non_square_maps_at_three_levels():
    value, sizes, loc, weights = _inputs(b=2, q=4, m=2, d=3, sizes=NON_SQUARE, p=3, seed=5, spread=0.15)
    expected = per_point_reference(value, sizes, loc, weights)
    torch.testing.assert_close(ms_deform_attn(value, sizes, loc, weights), expected, rtol=0, atol=1e-12)  # measured max |error| 1.2e-15
    # a point at the centre of pixel (row 2, column 4) of the 6×11 level reads that pixel: row-major, W = 11
    one = torch.zeros(1, 1, 1, 3, 1, 2, dtype=torch.float64)
    one[..., 0], one[..., 1] = (4 + 0.5) / 11, (2 + 0.5) / 6
    only_level_1 = torch.zeros(1, 1, 1, 3, 1, dtype=torch.float64)
    only_level_1[:, :, :, 1] = 1
    v = value[:1, :, :1]
    torch.testing.assert_close(ms_deform_attn(v, sizes, one, only_level_1)[0, 0], v[0, 13 * 7 + 2 * 11 + 4, 0])


def layer_reference(layer: MSDeformAttn, query, reference, value, sizes):
    """MSDeformAttn written out with its own weights: value projection split into heads; offsets
    in pixels of each level divided by that level's (W, H); per head one softmax over all
    levels × points; the per-point loop above; output projection."""
    b, q, c = query.shape
    m, n_levels, n_points = layer.heads, layer.levels, layer.points
    v = F.linear(value, layer.value_proj.weight, layer.value_proj.bias).view(b, -1, m, c // m)
    offsets = F.linear(query, layer.sampling_offsets.weight, layer.sampling_offsets.bias).view(b, q, m, n_levels, n_points, 2)
    logits = F.linear(query, layer.attention_weights.weight, layer.attention_weights.bias).view(b, q, m, n_levels * n_points)
    e = (logits - logits.max(-1, keepdim=True).values).exp()
    weights = (e / e.sum(-1, keepdim=True)).view(b, q, m, n_levels, n_points)
    loc = torch.empty(b, q, m, n_levels, n_points, 2, dtype=query.dtype)
    for level, (h, w) in enumerate(sizes):
        loc[:, :, :, level, :, 0] = reference[:, :, None, None, 0] + offsets[:, :, :, level, :, 0] / w
        loc[:, :, :, level, :, 1] = reference[:, :, None, None, 1] + offsets[:, :, :, level, :, 1] / h
    return F.linear(per_point_reference(v, sizes, loc, weights), layer.output_proj.weight, layer.output_proj.bias)


def test_layer_equals_the_written_out_forward_on_non_square_maps():
    from .helpers import randomise_

    layer = randomise_(MSDeformAttn(dim=8, levels=3, heads=2, points=2), 3).double()
    s = sum(h * w for h, w in NON_SQUARE)
    g = torch.Generator().manual_seed(4)
    query = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    value = torch.randn(2, s, 8, generator=g, dtype=torch.float64)
    reference = torch.rand(2, 5, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = layer(query, reference, value, NON_SQUARE)
        expected = layer_reference(layer, query, reference, value, NON_SQUARE)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)  # measured max |error| 1.8e-15


def test_attention_weights_are_one_softmax_per_head_over_levels_and_points():
    """A constant map of ones reads 1 at points far inside every level: the output per head is
    then the sum of its weights, which is 1 for a softmax over all levels × points (L for a
    softmax per level, whatever the logits)."""
    layer = MSDeformAttn(dim=8, levels=3, heads=2, points=2).double()
    with torch.no_grad():
        nn.init.zeros_(layer.sampling_offsets.weight)
        nn.init.zeros_(layer.sampling_offsets.bias)  # every point at its reference
        layer.attention_weights.weight.normal_(generator=torch.Generator().manual_seed(6))  # unequal weights
        layer.value_proj.weight.zero_()
        layer.value_proj.bias.fill_(1.0)  # V = 1 everywhere
        layer.output_proj.weight.copy_(torch.eye(8))
        layer.output_proj.bias.zero_()
    s = sum(h * w for h, w in NON_SQUARE)
    query = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    reference = torch.full((2, 4, 2), 0.5, dtype=torch.float64)  # the centre: inside every level
    with torch.no_grad():
        out = layer(query, reference, torch.zeros(2, s, 8, dtype=torch.float64), NON_SQUARE)
        logits = layer.attention_weights(query).view(2, 4, 2, 6)
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-12)
    assert logits.std() > 0.5  # the weights are far from uniform: a per-level softmax would give 3
