import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from unet_seg.heads import DAFORMER_DILATIONS, DAFormerHead, DiffusionFeatureFusion, scaled_dilations

from .helpers import randn, randomise_


def levels(b, channels, coarse, seed=0):
    """Fine to coarse, each level half the size of the previous, the last `coarse` pixels wide."""
    n = len(channels)
    return [randn(b, c, coarse * 2 ** (n - 1 - i), coarse * 2 ** (n - 1 - i), seed=seed + i) for i, c in enumerate(channels)]


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 2), coarse=st.integers(1, 3), n=st.integers(1, 3), classes=st.integers(2, 5))
def test_fusion_then_head_give_logits_at_twice_the_finest_level(b, coarse, n, classes):
    # one image at a 1×1 coarsest level leaves one value per GroupNorm group of the 2-channel-wide
    # bottleneck (dims 8 / 4, 2 groups), which torch refuses in training mode
    assume(b * coarse > 1)
    channels = [11, 7, 5][:n]
    dims = [32, 16, 8][:n]
    fusion = DiffusionFeatureFusion(channels, dims, fine_dim=8, bottleneck_groups=2, groups=4)
    finest = coarse * 2 ** (n - 1)
    head = DAFormerHead(fusion.out_channels, classes, embed_dim=8, dilations=(1, 2) if 2 * finest > 2 else (1,))  # d < the map's side
    out = fusion(levels(b, channels, coarse))
    assert [tuple(o.shape) for o in out] == [(b, 8, 2 * finest, 2 * finest)] + [
        (b, d, finest // 2**i, finest // 2**i) for i, d in enumerate(dims)
    ]
    assert fusion.out_channels == (8, *dims)
    logits = head(out)
    assert logits.shape == (b, classes, 2 * finest, 2 * finest)


def test_gradients_reach_every_trainable_weight_and_dtype_follows_the_module():
    fusion = DiffusionFeatureFusion([6, 4], [16, 8], fine_dim=8, bottleneck_groups=2, groups=4)
    head = DAFormerHead(fusion.out_channels, 3, embed_dim=8, dilations=(1, 2, 3))  # an 8² finest level
    head(fusion(levels(2, [6, 4], 2))).square().mean().backward()
    for name, p in [*fusion.named_parameters(), *head.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    fusion, head = fusion.double(), head.double()
    assert head(fusion([x.double() for x in levels(1, [6, 4], 2)])).dtype == torch.float64


def test_head_output_depends_on_every_level():
    fusion = DiffusionFeatureFusion([6, 4], [16, 8], fine_dim=8, bottleneck_groups=2, groups=4).eval()
    head = DAFormerHead(fusion.out_channels, 3, embed_dim=8).eval()
    x = levels(1, [6, 4], 2)
    with torch.no_grad():
        base = head(fusion(x))
        for i in range(2):
            changed = [t + (j == i) * randn(*t.shape, seed=100 + j) for j, t in enumerate(x)]
            assert not torch.allclose(head(fusion(changed)), base), f"level {i} ignored"


def test_wrong_level_channels_or_count_are_refused_naming_the_expected_shapes():
    fusion = DiffusionFeatureFusion([6, 4], [16, 8], fine_dim=8, bottleneck_groups=2, groups=4)
    with pytest.raises(ValueError, match=r"C = \[6, 4\]"):
        fusion(levels(1, [6, 5], 2))
    with pytest.raises(ValueError, match="2 maps"):
        fusion(levels(1, [6], 2))
    with pytest.raises(ValueError, match="one entry per level"):
        DiffusionFeatureFusion([6, 4], [16])


# ------------------------------------------------------------------------ dilations and the training map


def test_scaled_dilations_keep_daformers_at_its_map_and_scale_with_the_map():
    assert scaled_dilations(128) == DAFORMER_DILATIONS == (1, 6, 12, 18)  # 512² crops, stride 4
    assert scaled_dilations(64) == (1, 3, 6, 9)  # 512² crops, stride 8
    assert scaled_dilations(16) == (1, 2, 2, 2)  # the 64² demo crops, stride 4
    assert scaled_dilations(256) == (1, 12, 24, 36)
    count = lambda head: sum(p.numel() for p in head.parameters())  # noqa: E731
    assert count(DAFormerHead([8, 4], 3, 8, scaled_dilations(16))) == count(DAFormerHead([8, 4], 3, 8))  # same layers
    with pytest.raises(ValueError, match="must be >= 1"):
        scaled_dilations(0)


@settings(max_examples=50, deadline=None)
@given(a=st.integers(1, 600), b=st.integers(1, 600), ds=st.lists(st.integers(1, 40), min_size=1, max_size=5))
def test_scaled_dilations_are_positive_monotone_and_proportional(a, b, ds):
    small, large = sorted((a, b))
    lo, hi = scaled_dilations(small, ds), scaled_dilations(large, ds)
    assert len(lo) == len(ds) and all(1 <= x <= y for x, y in zip(lo, hi))
    assert all(x == 1 if d == 1 else abs(x - max(2, d * small / 128)) <= 0.5 for x, d in zip(lo, ds))


def test_training_refuses_dilations_that_reach_past_the_map_evaluation_keeps_them():
    head = DAFormerHead([4, 3], 2, embed_dim=4)  # DAFormer's (1, 6, 12, 18)
    x = [randn(2, 4, 18, 18, seed=1), randn(2, 3, 9, 9, seed=2)]
    with pytest.raises(ValueError, match=r"dilation 18 >= the 18×18 finest level.*scaled_dilations\(crop // stride\)"):
        head(x)
    head([randn(2, 4, 19, 19, seed=1), randn(2, 3, 10, 10, seed=2)])  # 19² > 18: trains
    assert head.eval()(x).shape == (2, 2, 18, 18)  # a trained head reads any size
    small = DAFormerHead([4, 3], 2, embed_dim=4, dilations=scaled_dilations(18))
    assert small.dilations == (1, 2, 2, 3) and small(x).shape == (2, 2, 18, 18)
    with pytest.raises(ValueError, match="integers >= 1"):
        DAFormerHead([4, 3], 2, dilations=(1, 0))


def test_a_dilation_at_least_the_map_side_is_the_centre_tap_alone():
    """Why training refuses them: every off-centre tap of a 3×3 kernel at dilation d >= n lands in
    the zero padding of an n×n map, so the branch is a 1×1 convolution with extra weights."""
    x, w = randn(1, 3, 6, 6, seed=3), randn(3, 1, 3, 3, seed=4)
    centre = torch.zeros_like(w)
    centre[..., 1, 1] = w[..., 1, 1]
    for d, alone in ((6, True), (9, True), (5, False)):
        dilated = F.conv2d(x, w, padding=d, dilation=d, groups=3)
        assert torch.allclose(dilated, F.conv2d(x, centre, padding=d, dilation=d, groups=3)) == alone


# ------------------------------------------------------------------------ independent references
# Each forward below is written out with torch.nn.functional and the module's own weights, so a
# module that is merely the right shape fails. Mutations these references catch (tried on
# scratch copies; the shape/gradient tests above pass all of them):
#   DAFormerHead: depthwise dilated 3×3 ASPP convs replaced by dense undilated 3×3 ones (also
#     off the parameter count); dilation ignored; embeddings upsampled nearest instead of bilinear.
#   DiffusionFeatureFusion: the finer level not added in the top-down path; the residual block's
#     skip dropped. (A dropped bottleneck shortcut was already caught: its weights get no gradient.)


def _conv_bn_relu_ref(x, block, dilation=1, groups=1):
    conv, bn = block[0], block[1]
    x = F.conv2d(x, conv.weight, None, padding=dilation * (conv.weight.shape[-1] // 2), dilation=dilation, groups=groups)
    return F.relu(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


def daformer_head_reference(head: DAFormerHead, levels_, dilations):
    """DAFormer's sepaspp head in eval mode: embed each level (1×1), bilinear to the finest size,
    concatenate; ASPP branch d = 1: 1×1 conv-BN-ReLU; d > 1: depthwise 3×3 conv at dilation d
    (padding d) -BN-ReLU, then pointwise 1×1 conv-BN-ReLU; concatenate, 3×3 conv-BN-ReLU, 1×1 classifier."""
    size = levels_[0].shape[-2:]
    x = torch.cat(
        [
            F.interpolate(F.conv2d(f, e.weight, e.bias), size=size, mode="bilinear", align_corners=False)
            for e, f in zip(head.embed, levels_)
        ],
        dim=1,
    )
    c = x.shape[1]
    branches = []
    for d, branch in zip(dilations, head.aspp):
        if d == 1:
            branches.append(_conv_bn_relu_ref(x, branch))
        else:
            assert branch[0][0].weight.shape == (c, 1, 3, 3), "ASPP branch is not depthwise 3×3"
            branches.append(_conv_bn_relu_ref(_conv_bn_relu_ref(x, branch[0], d, groups=c), branch[1]))
    y = _conv_bn_relu_ref(torch.cat(branches, 1), head.bottleneck)
    return F.conv2d(y, head.classify.weight, head.classify.bias)


def test_daformer_head_equals_the_written_out_sepaspp_forward():
    dilations = (1, 6, 12, 18)  # DAFormer's; the 16² finest level keeps taps of d = 6 and 12 inside
    head = randomise_(DAFormerHead([5, 4, 3], 3, embed_dim=4, dilations=dilations), 0).eval()
    x = [randn(2, c, 16 // 2**i, 16 // 2**i, seed=10 + i) for i, c in enumerate([5, 4, 3])]
    with torch.no_grad():
        got, expected = head(x), daformer_head_reference(head, x, dilations)
    # float32 defaults (rtol 1.3e-6, atol 1e-5); measured: bit-identical (max |error| 0.0, values up to 16)
    torch.testing.assert_close(got, expected)


def daformer_head_parameter_count(in_channels, num_classes, embed_dims=256, channels=256, dilations=(1, 6, 12, 18)):
    """Trainable parameters of mmseg's DAFormerHead as DIFF and DAFormer configure it
    (decoder_params: embed_cfg = mlp, fusion_cfg = aspp, sep=True, pool=False, BN + ReLU; ConvModule
    drops the conv bias before a norm), counted from that config, not from our module."""
    embed = sum(c * embed_dims + embed_dims for c in in_channels)  # nn.Linear per level
    c = embed_dims * len(in_channels)
    bn = lambda n: 2 * n  # noqa: E731  (weight, bias)
    aspp = sum(
        c * channels + bn(channels) if d == 1 else (c * 9 + bn(c)) + (c * channels + bn(channels)) for d in dilations
    )
    bottleneck = len(dilations) * channels * channels * 9 + bn(channels)
    conv_seg = channels * num_classes + num_classes
    return embed + aspp + bottleneck + conv_seg


def test_daformer_head_has_the_parameter_count_of_mmsegs_daformer_head_config():
    # DIFF's config (configs/_base_/models/daformer_sepaspp_diff.py): in_channels [256, 512, 1024, 2048]
    # on 19 classes: 4,433,171 parameters; DAFormer's MiT-B5 config: in_channels [64, 128, 320, 512]: 3,712,275.
    for in_channels, total in (((256, 512, 1024, 2048), 4_433_171), ((64, 128, 320, 512), 3_712_275)):
        assert daformer_head_parameter_count(in_channels, 19) == total
        head = DAFormerHead(in_channels, 19)
        assert sum(p.numel() for p in head.parameters()) == total


def fusion_reference(fusion: DiffusionFeatureFusion, levels_):
    """DIFF's F_conv written out: per level a GN bottleneck block (1×1-GN-ReLU, 3×3-GN-ReLU,
    1×1-GN, + 1×1-GN shortcut, ReLU) and a GroupNorm; then from the coarsest, ×2 transposed conv
    (kernel 4, stride 2, padding 1), + the next finer projection, + a residual block, ReLU."""

    def gn(x, norm):
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)

    def bottleneck(x, blk):
        b = blk.body
        y = F.relu(gn(F.conv2d(x, b[0].weight), b[1]))
        y = F.relu(gn(F.conv2d(y, b[3].weight, padding=1), b[4]))
        y = gn(F.conv2d(y, b[6].weight), b[7])
        return F.relu(y + gn(F.conv2d(x, blk.shortcut[0].weight), blk.shortcut[1]))

    proj = [gn(bottleneck(x, p), n) for x, p, n in zip(levels_, fusion.project, fusion.norm)]  # fine to coarse
    coarse_first, ups = proj[::-1], list(fusion.up)[::-1]
    x = coarse_first[0]
    for i, up in enumerate(ups):
        x = F.conv_transpose2d(x, up.up.weight, up.up.bias, stride=2, padding=1)
        if i + 1 < len(coarse_first):  # an odd finer side 2n − 1: the upsampled map's last row/column is not used
            finer = coarse_first[i + 1]
            x = x[..., : finer.shape[-2], : finer.shape[-1]] + finer
        r = up.res
        res = gn(F.conv2d(F.relu(gn(F.conv2d(x, r[0].weight, r[0].bias, padding=1), r[1])), r[3].weight, r[3].bias, padding=1), r[4])
        x = F.relu(x + res)
    return [x, *proj]


@pytest.mark.parametrize("latent", [None, (17, 11), (90, 20)])
def test_fusion_equals_the_written_out_bottleneck_and_upsample_add_forward(latent):
    """Levels half the size of the previous, or the U-Net's up.3/up.2/up.1 sizes at latents with
    odd sides (17×11: 17×11, 9×6, 5×3; BDD100K's 160×90 latents have 160×90, 80×45, 40×23)."""
    channels, dims = [6, 5, 3], [16, 8, 8]
    fusion = randomise_(DiffusionFeatureFusion(channels, dims, fine_dim=8, bottleneck_groups=2, groups=4), 1)
    if latent is None:
        x = levels(2, channels, 2)
    else:
        sizes = [(-(-latent[0] // 2**k), -(-latent[1] // 2**k)) for k in (0, 1, 2)]
        x = [randn(2, c, *hw, seed=i) for i, (c, hw) in enumerate(zip(channels, sizes))]
    with torch.no_grad():
        got, expected = fusion(x), fusion_reference(fusion, x)
    assert len(got) == len(expected) == 4
    assert got[0].shape[-2:] == tuple(2 * n for n in x[0].shape[-2:])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)  # float32 defaults; measured: bit-identical (max |error| 0.0)
