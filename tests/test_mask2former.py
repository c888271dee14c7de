"""Mask2Former's pixel decoder, masked-attention decoder and set loss: shapes, gradients,
invariants (tiny configs; the defaults are Mask2Former's)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_seg.mask2former import (
    MaskedAttentionDecoder, MSDeformAttnPixelDecoder, SetLossConfig, check_class_ids, point_sample, semantic_scores,
    semantic_targets, set_loss, sine_position_embedding, uncertain_points,
)  # fmt: skip
from unet_seg.mask2former.criterion import match
from unet_seg.mask2former.decoder import MaskedAttentionLayer

from .helpers import randn

CHANNELS = (8, 12, 16, 20)
TINY = dict(dim=32, mask_dim=24, layers=2, heads=4, points=2, ffn=48, groups=8)


def _features(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, size // s, size // s, generator=g) for c, s in zip(CHANNELS, (4, 8, 16, 32))]


def test_defaults_are_mask2formers():
    pixel = MSDeformAttnPixelDecoder((1024,) * 4)
    assert len(pixel.layers) == 6 and pixel.layers[0].attn.heads == 8 and pixel.layers[0].attn.points == 4
    assert pixel.layers[0].attn.levels == 3 and pixel.layers[0].ffn[0].out_features == 1024 and pixel.level_embed.shape == (3, 256)
    decoder = MaskedAttentionDecoder(19)
    assert len(decoder.layers) == 9 and decoder.layers[0].ffn[0].out_features == 2048 and decoder.class_embed.out_features == 20
    assert SetLossConfig() == SetLossConfig(2.0, 5.0, 5.0, 0.1, 12544, 3.0, 0.75)


def test_pixel_decoder_shapes_and_gradients():
    torch.manual_seed(0)
    pixel = MSDeformAttnPixelDecoder(CHANNELS, **TINY)
    for layer in pixel.layers:  # at init (zero weights) the positions reach nothing: as after a few steps
        torch.nn.init.normal_(layer.attn.sampling_offsets.weight, std=0.1)
        torch.nn.init.normal_(layer.attn.attention_weights.weight, std=0.1)
    feats = [f.requires_grad_() for f in _features()]
    mask_features, memories = pixel(feats)
    assert mask_features.shape == (2, 24, 16, 16)
    assert [tuple(m.shape) for m in memories] == [(2, 32, 2, 2), (2, 32, 4, 4), (2, 32, 8, 8)]  # strides 32, 16, 8
    (mask_features.square().mean() + sum(m.square().mean() for m in memories)).backward()
    assert all(f.grad.abs().sum() > 0 for f in feats)
    for name, p in pixel.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pixel_decoder_is_per_image_and_float32_under_autocast():
    torch.manual_seed(0)
    pixel = MSDeformAttnPixelDecoder(CHANNELS, **TINY).eval()
    feats = _features()
    both, _ = pixel(feats)
    alone, _ = pixel([f[1:] for f in feats])
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_features, memories = pixel([f.bfloat16() for f in feats])
    assert mask_features.dtype == torch.float32 and all(m.dtype == torch.float32 for m in memories)


def test_pixel_decoder_refuses_wrong_levels():
    pixel = MSDeformAttnPixelDecoder(CHANNELS, **TINY)
    with pytest.raises(ValueError, match="4 maps"):
        pixel(_features()[:3])
    with pytest.raises(ValueError, match="4 backbone levels"):
        MSDeformAttnPixelDecoder(CHANNELS[:3])


@settings(max_examples=20, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), feats=st.sampled_from([2, 4, 16]))
def test_sine_embedding_values(h, w, feats):
    pos = sine_position_embedding(h, w, feats)
    assert pos.shape == (2 * feats, h, w) and pos.abs().max() <= 1
    assert torch.equal(pos[:feats], pos[:feats, :, :1].expand(-1, -1, w))  # the y half varies along rows only
    assert torch.equal(pos[feats:], pos[feats:, :1].expand(-1, h, -1))
    row = (torch.arange(1, h + 1) / (h + 1e-6) * 2 * math.pi)  # frequency 1 for the first pair: (j+1)/(h+ε)·2π
    torch.testing.assert_close(pos[0, :, 0], row.sin())
    torch.testing.assert_close(pos[1, :, 0], row.cos())


def _decoder(num_classes=5, layers=3):
    torch.manual_seed(0)
    return MaskedAttentionDecoder(num_classes, dim=32, heads=4, layers=layers, ffn=48)


def _decoder_inputs(b=2, q=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    memories = [torch.randn(b, 32, s, s, generator=g) for s in (2, 4, 8)]
    return torch.randn(b, 32, 16, 16, generator=g), memories, torch.randn(b, q, 32, generator=g), torch.randn(b, q, 32, generator=g)


def test_decoder_gives_one_prediction_per_layer_plus_the_initial_and_trains_everything():
    decoder = _decoder()
    mask_features, memories, q, pos = _decoder_inputs()
    q.requires_grad_()
    all_cls, all_masks = decoder(mask_features, memories, q, pos)
    assert len(all_cls) == len(all_masks) == 4
    assert all(c.shape == (2, 6, 6) for c in all_cls) and all(m.shape == (2, 6, 16, 16) for m in all_masks)
    (sum(c.square().mean() for c in all_cls) + sum(m.square().mean() for m in all_masks)).backward()
    assert q.grad.abs().sum() > 0
    for name, p in decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert semantic_scores(all_cls[-1], all_masks[-1]).shape == (2, 5, 16, 16)


def test_semantic_scores_upsample_the_mask_logits_before_the_sigmoid():
    # one query of class 0 (softmax (0.5, 0.25, 0.25) over class 0, class 1, no-object), mask logits
    # (-8, 8) over two pixels resized to four: bilinear, half-pixel centres -> (-8, -4, 4, 8), then σ
    cls = torch.tensor([[[math.log(2.0), 0.0, 0.0]]])
    masks = torch.tensor([[[[-8.0, 8.0]]]])
    sigma = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = [[0.5 * sigma(v) for v in (-8, -4, 4, 8)], [0.25 * sigma(v) for v in (-8, -4, 4, 8)]]
    got = semantic_scores(cls, masks, (1, 4))
    torch.testing.assert_close(got[0, :, 0], torch.tensor(expected))  # sigmoid first gives 0.5·(σ(−8)·¾ + σ(8)·¼) = 0.125 at pixel 1
    assert semantic_scores(cls, masks).shape == (1, 2, 1, 2)


def test_decoder_is_per_image():
    decoder = _decoder().eval()
    mask_features, memories, q, pos = _decoder_inputs()
    cls, masks = decoder(mask_features, memories, q, pos)
    cls1, masks1 = decoder(mask_features[1:], [m[1:] for m in memories], q[1:], pos[1:])
    torch.testing.assert_close(cls[-1][1:], cls1[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masks[-1][1:], masks1[-1], atol=1e-5, rtol=1e-5)


def test_masked_cross_attention_ignores_blocked_memory():
    torch.manual_seed(0)
    layer = MaskedAttentionLayer(16, 4, 32).eval()
    q, pos = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    memory, memory_pos = torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    blocked = torch.zeros(2, 3, 10, dtype=torch.bool)
    blocked[:, :, 4:] = True
    changed = memory.clone()
    changed[:, 4:] = 100 * torch.randn(2, 6, 16)
    torch.testing.assert_close(layer(q, pos, memory, memory_pos, blocked), layer(q, pos, changed, memory_pos, blocked))
    assert not torch.allclose(layer(q, pos, memory, memory_pos, blocked & False), layer(q, pos, changed, memory_pos, blocked & False))


def test_a_query_masking_everything_attends_everywhere():
    decoder = _decoder()
    mask_features, memories, q, _ = _decoder_inputs()
    _, _, blocked = decoder._predict(q, -mask_features.abs() - 1, (4, 4))  # some queries predict all-negative masks
    assert blocked.shape == (2, 6, 16)
    assert not blocked.all(-1).any()


def test_decoder_compiles_without_graph_breaks():
    decoder, pixel = _decoder(), MSDeformAttnPixelDecoder(CHANNELS, **{**TINY, "mask_dim": 32})
    feats, (_, _, q, pos) = _features(), _decoder_inputs()
    run = lambda f: decoder(*pixel(f), q, pos)[1][-1]  # noqa: E731
    torch.testing.assert_close(torch.compile(run, backend="eager", fullgraph=True)(feats), run(feats))


# --------------------------------------------------------------------------------------------- set loss


def test_point_sample_reads_pixel_centres_and_uncertain_points_find_the_boundary():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    centres = torch.tensor([[[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3], [1.5 / 4, 1.5 / 3]]])
    torch.testing.assert_close(point_sample(x, centres).flatten(), torch.tensor([0.0, 11.0, 5.0]))
    logits = torch.full((2, 1, 32, 32), 20.0)
    logits[:, :, :, :16] = 0.0  # uncertain: the left half
    coords = uncertain_points(logits, 100, 3.0, 0.75, torch.Generator().manual_seed(0))
    assert coords.shape == (2, 100, 2) and coords.min() >= 0 and coords.max() <= 1
    left = coords[..., 0] < 0.5
    assert left[:, :75].all()  # the 75 important points, of 300 candidates (≈ 150 on the left)
    assert 5 < left[:, 75:].sum() < 45  # the 2 × 25 uniform ones: about half


def _targets(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (b, size // 8, size // 8), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    labels[0, :4, :4] = 255
    return labels


def test_semantic_targets_are_one_mask_per_class_flagged_where_present():
    labels = _targets()
    labels[1][labels[1] == 2] = 0  # image 1 holds classes 0 and 1 only
    present, masks = semantic_targets(labels, 4)
    assert present.tolist() == [[True, True, True, False], [True, True, False, False]]
    assert masks.shape == (2, 4, 32, 32) and masks.dtype == torch.float32
    torch.testing.assert_close(masks.sum(1), (labels != 255).float())  # ignore pixels belong to no class
    assert torch.equal(masks[:, 1].bool(), labels == 1)


def test_labels_outside_the_vocabulary_are_refused_with_their_ids():
    labels = _targets()
    labels[0, 0, 0], labels[1, 0, 0] = 7, -1
    with pytest.raises(ValueError, match=r"outside 0..2.*\[-1, 7\]"):
        semantic_targets(labels, 3)
    with pytest.raises(ValueError, match="class ids"):
        check_class_ids(labels.float(), 3)


def _perfect(labels, num_classes=3, q=5, flip=False):
    """Queries 0..K-1 predict class k with its mask (±8 logits at stride 4), the rest no-object."""
    b = labels.shape[0]
    cls = torch.full((b, q, num_classes + 1), -8.0)
    cls[:, num_classes:, num_classes] = 8.0
    masks = torch.full((b, q, labels.shape[1] // 4, labels.shape[2] // 4), -8.0)
    small = labels[:, 2::4, 2::4]
    for k in range(num_classes):
        cls[:, k, k] = 8.0
        masks[:, k][small == k] = 8.0
    return cls, (-masks if flip else masks)


def test_set_loss_is_small_for_the_right_answer_and_large_for_the_inverted_masks():
    labels = _targets()
    targets = semantic_targets(labels, 3)
    cfg = SetLossConfig(points=256)
    good = set_loss(*[[t] for t in _perfect(labels)], *targets, cfg, torch.Generator().manual_seed(0))
    bad = set_loss(*[[t] for t in _perfect(labels, flip=True)], *targets, cfg, torch.Generator().manual_seed(0))
    assert good < 0.05 * bad, (good, bad)


def test_set_loss_without_targets_is_the_weighted_no_object_cross_entropy():
    cls = randn(2, 4, 4, seed=12)
    labels = torch.full((2, 8, 8), 255)
    loss = set_loss([cls], [randn(2, 4, 2, 2, seed=13)], *semantic_targets(labels, 3))
    expected = 2.0 * torch.nn.functional.cross_entropy(cls.flatten(0, 1), torch.full((8,), 3))
    torch.testing.assert_close(loss, expected)


def test_matching_is_permutation_equivariant_and_loss_reaches_only_matched_masks():
    labels = _targets()
    labels[1][labels[1] == 2] = 0  # class 2 absent from image 1: no query of it is matched or trained
    present, masks = semantic_targets(labels, 3)
    cls, pred = _perfect(labels)
    cls = cls + 0.1 * randn(cls.shape, seed=14)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(15))
    cfg = SetLossConfig(points=256)
    queries = match([cls], [pred], present, masks, cfg, torch.Generator().manual_seed(1))[0]
    permuted = match([cls[:, perm]], [pred[:, perm]], present, masks, cfg, torch.Generator().manual_seed(1))[0]
    assert queries.tolist() == [[0, 1, 2], [0, 1, -1]]
    assert torch.equal(torch.where(present, perm[permuted.clamp(min=0)], -1), queries)
    pred.requires_grad_()
    set_loss([cls], [pred], present, masks, cfg).backward()
    touched = pred.grad.flatten(2).abs().sum(-1) > 0
    assert touched.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]


def test_set_loss_refuses_targets_of_another_vocabulary():
    labels = _targets()
    cls, pred = _perfect(labels)
    with pytest.raises(ValueError, match="K\\+1"):
        set_loss([cls], [pred], *semantic_targets(labels, 4))


# ------------------------------------------------------- the set loss against a loop of its terms


def _bilinear(mask, x, y):
    """mask [h, w] at normalised (x, y): pixel (i, j) centred at ((j + ½)/w, (i + ½)/h), zeros outside."""
    h, w = mask.shape
    px, py = x * w - 0.5, y * h - 0.5
    j0, i0 = math.floor(px), math.floor(py)
    total = 0.0
    for i in (i0, i0 + 1):
        for j in (j0, j0 + 1):
            if 0 <= i < h and 0 <= j < w:
                total += (1 - abs(px - j)) * (1 - abs(py - i)) * float(mask[i, j])
    return total


def set_loss_reference(all_cls, all_masks, labels, num_classes, cfg, seed):
    """Mask2Former's SetCriterion for semantic segmentation as loops over steps, images, queries,
    targets and points, replaying the generator's draws in the criterion's order (the matching
    points of every step and image; then per step the candidate and the uniform points of every
    (image, class) mask, absent classes' included). Targets: per image the classes present, one
    mask each. Matching: the cheapest assignment over all injective maps targets -> queries
    (brute force)."""
    import itertools

    g = torch.Generator().manual_seed(seed)
    n_points, important = cfg.points, int(cfg.importance_sample_ratio * cfg.points)
    classes = [sorted(set(lab.flatten().tolist()) - {255}) for lab in labels]
    masks = [[(lab == c).float() for c in cs] for lab, cs in zip(labels, classes)]
    num_masks = max(sum(len(c) for c in classes), 1)
    matched = []  # per step {(image, query): target index}
    for cls, logits in zip(all_cls, all_masks):
        b, q = cls.shape[:2]
        target_of = {}
        all_pts = torch.rand(b, n_points, 2, generator=g).tolist()
        for i in range(b):
            t_n = len(classes[i])
            pts = all_pts[i]
            cost = [[0.0] * t_n for _ in range(q)]
            for qi in range(q):
                prob = torch.softmax(cls[i, qi].double(), -1)
                xs = [_bilinear(logits[i, qi], x, y) for x, y in pts]
                for ti in range(t_n):
                    ys = [_bilinear(masks[i][ti], x, y) for x, y in pts]
                    bce = sum(math.log1p(math.exp(-abs(a))) + max(a, 0) - a * t for a, t in zip(xs, ys)) / n_points
                    s = [1 / (1 + math.exp(-a)) for a in xs]
                    dice = 1 - (2 * sum(si * t for si, t in zip(s, ys)) + 1) / (sum(s) + sum(ys) + 1)
                    cost[qi][ti] = -cfg.class_weight * prob[classes[i][ti]].item() + cfg.mask_weight * bce + cfg.dice_weight * dice
            best = min(itertools.permutations(range(q), t_n), key=lambda qs: sum(cost[qs[t]][t] for t in range(t_n)))
            target_of.update({(i, qi): ti for ti, qi in enumerate(best)})
        matched.append(target_of)
    total = 0.0
    for cls, logits, target_of in zip(all_cls, all_masks, matched):
        b, q = cls.shape[:2]
        # class term: cross-entropy over every query, weighted mean with weight no_object_weight on "no object"
        num = den = 0.0
        for i in range(b):
            for qi in range(q):
                k = int(classes[i][target_of[i, qi]]) if (i, qi) in target_of else num_classes
                weight = cfg.no_object_weight if k == num_classes else 1.0
                num -= weight * torch.log_softmax(cls[i, qi].double(), -1)[k].item()
                den += weight
        total += cfg.class_weight * num / den
        # mask terms of the matched masks; the draws of mask (image i, class c) are row i·K + c
        cand = torch.rand(b * num_classes, int(n_points * cfg.oversample_ratio), 2, generator=g).tolist()
        rest = torch.rand(b * num_classes, n_points - important, 2, generator=g).tolist()
        bce_sum = dice_sum = 0.0
        for (i, qi), ti in target_of.items():
            n = i * num_classes + classes[i][ti]
            uncertainty = [-abs(_bilinear(logits[i, qi], x, y)) for x, y in cand[n]]
            top = sorted(range(len(cand[n])), key=lambda c: -uncertainty[c])[:important]
            pts = [cand[n][c] for c in top] + rest[n]
            xs = [_bilinear(logits[i, qi], x, y) for x, y in pts]
            ys = [_bilinear(masks[i][ti], x, y) for x, y in pts]
            bce_sum += sum(math.log1p(math.exp(-abs(a))) + max(a, 0) - a * t for a, t in zip(xs, ys)) / n_points
            s = [1 / (1 + math.exp(-a)) for a in xs]
            dice_sum += 1 - (2 * sum(si * t for si, t in zip(s, ys)) + 1) / (sum(s) + sum(ys) + 1)
        total += (cfg.mask_weight * bce_sum + cfg.dice_weight * dice_sum) / num_masks
    return total


def test_set_loss_equals_a_loop_over_its_terms_with_their_reductions():
    """Two prediction steps, two images (3 and 2 classes present, ignore pixels in one), 4 queries,
    mask logits 5×7 against labels 10×13: class CE over all queries with the no-object weight
    0.1 as a weighted mean, BCE and Dice of the matched masks at importance-sampled points, both
    summed over masks and divided by the number of target masks of the batch."""
    g = torch.Generator().manual_seed(21)
    labels = torch.randint(0, 3, (2, 10, 13), generator=g)
    labels[1][labels[1] == 2] = 1
    labels[1, :2] = 255
    present, masks = semantic_targets(labels, 3)
    assert present.sum(1).tolist() == [3, 2]
    all_cls = [torch.randn(2, 4, 4, generator=g) for _ in range(2)]
    all_masks = [3 * torch.randn(2, 4, 5, 7, generator=g) for _ in range(2)]
    cfg = SetLossConfig(points=12, oversample_ratio=3.0, importance_sample_ratio=0.75)
    got = set_loss(all_cls, all_masks, present, masks, cfg, torch.Generator().manual_seed(5))
    expected = set_loss_reference(all_cls, all_masks, labels, 3, cfg, seed=5)
    assert abs(got.item() - expected) <= 1e-5 * abs(expected), (got.item(), expected)  # measured 2.5e-8 relative (float32 against float64)
