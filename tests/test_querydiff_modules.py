"""QueryDiff's released modules (unet_seg.querydiff) and the Rein backbones (unet_seg.backbones)."""

import math

import pytest
import torch
import torch.nn.functional as F

from unet_seg.backbones import ReinConvNet, Reins
from unet_seg.querydiff import (
    DiffusionConsistency, DiffusionTokens, ProgressiveMerge, QueryRefinement, merge_schedule, token_grid,
)  # fmt: skip

from .helpers import rand, randn, randomise_


def test_merge_schedule_and_token_grid():
    assert merge_schedule(24) == [12, 6, 3]  # the release's L_list
    assert merge_schedule(4) == [2, 1, 1]
    assert token_grid(100) == (10, 10) and token_grid(8) == (2, 4) and token_grid(7) == (1, 7)


def test_progressive_merge_shapes_gradients_and_size():
    torch.manual_seed(0)
    merge = ProgressiveMerge(layers=6, tokens=5, dim=12, embed_dim=16, heads=4)
    tokens = torch.randn(6, 5, 12, requires_grad=True)
    q = merge(tokens)
    assert q.shape == (5, 12)
    q.square().sum().backward()
    assert tokens.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in merge.parameters())
    # per stage: proj_in + proj_out (2·r·c·e + r·c + e), groups, MHA (4e² + 4e), LN (2e); the final MLP
    r, c, e = 5, 12, 16
    stage = lambda out: 2 * r * c * e + r * c + e + out * e + 4 * e * e + 4 * e + 2 * e  # noqa: E731
    mlp = 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c)
    assert sum(p.numel() for p in merge.parameters()) == stage(3) + stage(2) + stage(1) + mlp
    with pytest.raises(ValueError, match="Rein tokens"):
        merge(torch.randn(5, 5, 12))


def test_release_sized_merge_has_about_315m_parameters():
    # the digest's arithmetic: each stage's proj_in + proj_out ≈ 2 × 52.4 M at r = 100, c = 1024
    r, c, e = 100, 1024, 512
    per_stage = 2 * r * c * e + r * c + e
    assert abs(3 * per_stage / 1e6 - 315) < 1


def _dcl_reference(dcl, q, weak, strong):
    """The release's lines, written out element by element where cheap."""
    c = q.shape[-1]
    p = q @ dcl.mlp_feat.weight.T + dcl.mlp_feat.bias
    k = weak @ dcl.mlp_diff_w.weight.T + dcl.mlp_diff_w.bias
    s = torch.softmax(torch.einsum("bnc,bmc->bnm", p, k) / math.sqrt(c), dim=-1)
    rebuilt = torch.einsum("bnm,bmc->bnc", s, q) @ dcl.mlp_diff_new.weight.T + dcl.mlp_diff_new.bias
    target = torch.softmax(strong, -1)
    kl = (target * (target.log() - torch.log_softmax(rebuilt, -1))).sum() / q.shape[0]
    diff = (q - torch.einsum("bnm,bmc->bnc", s, weak)).abs()
    huber = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
    return kl, huber


def test_dcl_matches_the_release_lines_and_sends_gradient_only_into_the_queries():
    torch.manual_seed(0)
    dcl = DiffusionConsistency(8)
    q = (2 * torch.randn(3, 6, 8)).requires_grad_()
    weak, strong = torch.randn(3, 6, 8, requires_grad=True), torch.randn(3, 6, 8, requires_grad=True)
    l_dist, l_sup = dcl(q, weak, strong)
    ref_dist, ref_sup = _dcl_reference(dcl, q, weak, strong)
    torch.testing.assert_close(l_dist, ref_dist)
    torch.testing.assert_close(l_sup, ref_sup)
    l_sup.backward(retain_graph=True)
    assert q.grad.abs().sum() > 0 and weak.grad is None and strong.grad is None  # L_sup's target is detached
    assert all(p.grad is None for p in dcl.parameters())
    l_dist.backward()
    assert strong.grad is None and weak.grad.abs().sum() > 0  # F_s is a detached target; F_w shapes S
    assert all(p.grad.abs().sum() > 0 for p in dcl.parameters())
    with pytest.raises(ValueError, match="M = N"):
        dcl(q, weak[:, :5], strong[:, :5])


def test_dcl_is_zero_when_the_queries_are_the_weak_tokens_rebuilt():
    # L_sup vanishes when every query equals the weak token it attends to (one-hot S)
    dcl = DiffusionConsistency(4)
    with torch.no_grad():
        dcl.mlp_feat.weight.copy_(100 * torch.eye(4)), dcl.mlp_feat.bias.zero_()
        dcl.mlp_diff_w.weight.copy_(torch.eye(4)), dcl.mlp_diff_w.bias.zero_()
    weak = torch.eye(4)[None] * 3  # 4 orthogonal tokens
    _, l_sup = dcl(weak.clone(), weak, weak)
    assert l_sup < 1e-6


def test_diffusion_tokens_are_frozen_and_pooled_to_r_tokens():
    tokens = DiffusionTokens((6, 10), dim=8, tokens=12, seed=0)
    assert list(tokens.parameters()) == []
    maps = [randn(2, 6, 12, 12, seed=12), randn(2, 10, 6, 6, seed=13)]
    out = tokens(maps)
    assert out.shape == (2, 12, 8)
    again = DiffusionTokens((6, 10), dim=8, tokens=12, seed=0)(maps)
    assert torch.equal(out, again)  # the projection is a function of the seed: the same after a restart
    constant = [torch.ones(1, 6, 12, 12), torch.ones(1, 10, 6, 6)]
    first = tokens(constant)
    assert torch.allclose(first, first[:, :1].expand_as(first))  # pooling a constant map: every token equal


def test_refinement_has_no_residual_and_keeps_shapes():
    torch.manual_seed(0)
    refine = QueryRefinement(dim=16, heads=4).eval()
    mask_features = torch.randn(2, 16, 16, 16)
    memories = [torch.randn(2, 16, s, s) for s in (2, 4, 8)]
    q = torch.randn(2, 5, 16)
    out, mems = refine(mask_features, memories, q)
    assert out.shape == mask_features.shape and [m.shape for m in mems] == [m.shape for m in memories]
    # with all agent queries equal, attention returns the same value for every pixel: without a
    # residual the refined maps cannot depend on the pixel features at all
    same = q[:, :1].expand(-1, 5, -1)
    a = refine(mask_features, memories, same)
    b = refine(torch.randn_like(mask_features), [torch.randn_like(m) for m in memories], same)
    torch.testing.assert_close(a[0], b[0])
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a[1], b[1]))


def test_rein_conv_net_gives_four_strided_maps_and_its_tokens():
    net = ReinConvNet(width=16, tokens=6)
    maps = net(rand(2, 3, 64, 64, seed=14) * 2 - 1)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4), (2, 16, 2, 2)]
    assert net.reins.tokens().shape == (4, 6, 16)
    sum(m.mean() for m in maps).backward()
    assert net.reins.tokens_a.grad.abs().sum() > 0  # the tokens refine the features


def test_reins_change_only_the_patch_tokens():
    reins = Reins(2, 8, tokens=4)
    x = randn(1, 5, 8, seed=15)
    out = reins(x, 1, prefix=1)
    assert torch.equal(out[:, :1], x[:, :1]) and not torch.equal(out[:, 1:], x[:, 1:])


# ------------------------------------------------------------------------ independent references
# nn.MultiheadAttention, nn.LayerNorm, GELU and the separable convs written out with the modules'
# own weights. Mutations these catch (the tests above pass them): ProgressiveMerge without its
# progressive merge (every stage reading the Rein tokens, their means averaged), the group tokens
# as keys instead of queries, GELU's tanh approximation; QueryRefinement with every fuse conv at
# dilation 1, memories resized nearest instead of bilinear.


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt((x - mean).square().mean(-1, keepdim=True) + norm.eps) * norm.weight + norm.bias


def _mha(mha, query, key_value):
    """nn.MultiheadAttention (batch_first, no masks) for one batch row, head by head: query [Lq, e],
    key_value [Lk, e] -> [Lq, e]."""
    e, heads = mha.embed_dim, mha.num_heads
    wq, wk, wv = mha.in_proj_weight.split(e)
    bq, bk, bv = mha.in_proj_bias.split(e)
    q, k, v = query @ wq.T + bq, key_value @ wk.T + bk, key_value @ wv.T + bv
    d = e // heads
    out = [torch.softmax(q[:, h * d : (h + 1) * d] @ k[:, h * d : (h + 1) * d].T / math.sqrt(d), -1) @ v[:, h * d : (h + 1) * d] for h in range(heads)]
    return torch.cat(out, -1) @ mha.out_proj.weight.T + mha.out_proj.bias


def progressive_merge_reference(merge, tokens):
    """Per stage: each layer's [r, c] tokens flattened to one r·c token, projected to e; the group
    tokens attend to them; LN; back to r·c; the next stage reads this stage's groups. Then the mean
    over the last groups and LN -> Linear -> GELU (erf) -> Linear."""
    q = tokens
    for stage in merge.stages:
        x = q.reshape(q.shape[0], -1) @ stage.proj_in.weight.T + stage.proj_in.bias
        out = _layer_norm(_mha(stage.attn, stage.group_tokens, x), stage.norm)
        q = (out @ stage.proj_out.weight.T + stage.proj_out.bias).reshape(-1, *tokens.shape[1:])
    ln, fc1, _, fc2 = merge.mlp
    h = _layer_norm(q.mean(0), ln) @ fc1.weight.T + fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ fc2.weight.T + fc2.bias


def test_progressive_merge_equals_the_written_out_stages():
    merge = randomise_(ProgressiveMerge(layers=6, tokens=3, dim=4, embed_dim=8, heads=2), 0)
    tokens = randn(6, 3, 4, seed=1)
    with torch.no_grad():
        got, expected = merge(tokens), progressive_merge_reference(merge, tokens)
    torch.testing.assert_close(got, expected)  # float32 defaults; measured max |error| 2.4e-7 (values up to 1.1)


def _bilinear(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def query_refinement_reference(refine, mask_features, memories, q):
    """Each map's pixels attend to Linear(q) (no residual), bilinear to stride 4, concatenated;
    branch k: depth-wise 3×3 at dilation k (padding k), 1×1, BN (eval), ReLU; branch 1 is the
    mask features, branches 2..4 resized to the memories."""
    b = q.shape[0]
    kv = q @ refine.query_proj.weight.T + refine.query_proj.bias
    size = mask_features.shape[-2:]
    refined = []
    for f in (mask_features, *memories):
        c, h, w = f.shape[1:]
        out = torch.stack([_mha(refine.cross_attn, f[i].flatten(1).T, kv[i]).T.reshape(c, h, w) for i in range(b)])
        refined.append(out if (h, w) == size else _bilinear(out, size))
    x = torch.cat(refined, 1)
    fused = []
    for k, (dw, pw, bn, _) in zip((1, 2, 3, 4), refine.fuse_convs):
        y = F.conv2d(F.conv2d(x, dw.weight, padding=k, dilation=k, groups=x.shape[1]), pw.weight)
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        fused.append(F.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None]))
    return fused[0], [_bilinear(g, m.shape[-2:]) for g, m in zip(fused[1:], memories)]


def test_query_refinement_equals_the_written_out_attention_and_dilated_branches():
    refine = randomise_(QueryRefinement(dim=4, heads=2), 2).eval()
    g = torch.Generator().manual_seed(3)
    mask_features = torch.randn(2, 4, 12, 12, generator=g)
    memories = [torch.randn(2, 4, s, s, generator=g) for s in (3, 6, 9)]
    q = torch.randn(2, 5, 4, generator=g)
    with torch.no_grad():
        out, mems = refine(mask_features, memories, q)
        ref_out, ref_mems = query_refinement_reference(refine, mask_features, memories, q)
    for a, b in zip([out, *mems], [ref_out, *ref_mems]):
        torch.testing.assert_close(a, b)  # float32 defaults; measured max |error| 3.6e-7 (values up to 0.6)
