import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_seg.attention import (
    AgentQueries,
    AgentRefinement,
    attention_map_capture,
    context_slice_procs,
    cross_attention_layers,
    kv_fusion_attention,
    kv_fusion_procs,
    self_attention_layers,
)
from unet_seg.models.unet import TINY_SD1, TINY_SD2

from .helpers import randn, tiny_unet

seeds = st.integers(0, 2**31 - 1)


def grouped_qkv(groups, supports, heads, length, d, seed):
    """q, k, v [G·(1+S), heads, L, d] in the episode layout."""
    b = groups * (1 + supports)
    return [randn(b, heads, length, d, seed=seed + i) for i in range(3)]


def episodes(x, groups, supports):
    return x.unflatten(0, (groups, 1 + supports))


# (groups G, supports S, heads, tokens L, head width d)
episode_shapes = st.tuples(*(st.integers(1, n) for n in (3, 3, 3, 12, 8)))


# ------------------------------------------------------------------------ layer-name helpers


def test_layer_name_helpers_split_self_and_cross_attention():
    names = tiny_unet("sd1").attention_names
    self_layers, cross_layers = self_attention_layers(names), cross_attention_layers(names)
    assert self_layers and cross_layers
    assert all(n.endswith(".self") for n in self_layers) and all(n.endswith(".cross") for n in cross_layers)
    assert sorted(self_layers + cross_layers) == sorted(names)


# ------------------------------------------------------------------------ attention-map capture


@given(
    b=st.integers(1, 2),
    heads=st.integers(1, 3),
    lat=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    s_exp=st.integers(0, 2),
    lk=st.integers(1, 9),
    d=st.integers(1, 8),
    seed=seeds,
)
def test_attention_map_capture_returns_sdpa_output_and_head_mean_softmax_maps(b, heads, lat, s_exp, lk, d, seed):
    s = 2**s_exp
    lat_h, lat_w = lat[0] * s, lat[1] * s  # the layer's grid is lat at downsampling s
    lq = lat[0] * lat[1]
    q = randn(b, heads, lq, d, seed=seed)
    k, v = randn(b, heads, lk, d, seed=seed + 1), randn(b, heads, lk, d, seed=seed + 2)
    procs, maps = attention_map_capture(["layer"], (lat_h, lat_w))
    out = procs["layer"](q, k, v, "layer")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    manual = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1).mean(1)  # [B, Lq, Lk]
    expected = manual.transpose(1, 2).reshape(b, lk, lat[0], lat[1])
    torch.testing.assert_close(maps["layer"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps["layer"].sum(1), torch.ones(b, lat[0], lat[1]))


@pytest.mark.parametrize("lat", [(16, 8), (17, 11), (12, 20)])
def test_attention_map_capture_records_every_requested_unet_layer_with_its_grid(lat):
    """Level l's grid is the latent's sides halved l times, rounding up (17×11: 9×6, 5×3, 3×2)."""
    unet = tiny_unet("sd2")
    layers = cross_attention_layers(unet.attention_names)
    procs, maps = attention_map_capture(layers, lat)
    x, ctx = randn(2, 4, *lat), randn(2, 5, TINY_SD2.context_dim, seed=1)
    with torch.no_grad():
        out = unet(x, 500, ctx, procs=procs)
        torch.testing.assert_close(out, unet(x, 500, ctx), rtol=1e-5, atol=1e-5)
    assert set(maps) == set(layers)
    level_of = {"down.0": 0, "down.1": 1, "down.2": 2, "mid": 3, "up.1": 2, "up.2": 1, "up.3": 0}
    for name, m in maps.items():
        grid = lat
        for _ in range(level_of[name.split(".attn.")[0]]):
            grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        assert m.shape == (2, 5, *grid), name
        torch.testing.assert_close(m.sum(1), torch.ones(2, *grid))


def test_attention_map_capture_rejects_a_sequence_that_is_no_grid_of_the_latent():
    procs, _ = attention_map_capture(["a"], (8, 8))
    q = randn(1, 1, 6, 4)  # 6 tokens: no (8/s)·(8/s) grid
    with pytest.raises(ValueError, match="no .* grid"):
        procs["a"](q, q, q, "a")
    with pytest.raises(ValueError, match="latent_size"):
        attention_map_capture(["a"], (0, 8))


def test_attention_map_capture_compiles_without_graph_breaks():
    procs, maps = attention_map_capture(["a"], (4, 4))
    q = randn(2, 2, 16, 4)
    out = torch.compile(lambda q: procs["a"](q, q, q, "a"), fullgraph=True, backend="eager")(q)
    assert out.shape == q.shape and maps["a"].shape == (2, 16, 4, 4)


# ------------------------------------------------------------------------ KV fusion


@given(shape=episode_shapes, seed=seeds)
def test_kv_fusion_without_supports_equals_self_attention(shape, seed):
    groups, _, heads, length, d = shape
    q, k, v = grouped_qkv(groups, 0, heads, length, d, seed)
    torch.testing.assert_close(kv_fusion_attention(q, k, v, 0), F.scaled_dot_product_attention(q, k, v))


@given(shape=episode_shapes, seed=seeds)
def test_kv_fusion_matches_explicit_concatenation_per_episode(shape, seed):
    groups, supports, heads, length, d = shape
    q, k, v = grouped_qkv(groups, supports, heads, length, d, seed)
    out = episodes(kv_fusion_attention(q, k, v, supports), groups, supports)
    qe, ke, ve = (episodes(x, groups, supports) for x in (q, k, v))
    for g in range(groups):
        k_cat = torch.cat(list(ke[g]), dim=1)  # [heads, (1+S)·L, d]
        v_cat = torch.cat(list(ve[g]), dim=1)
        weights = torch.softmax(qe[g, 0] @ k_cat.transpose(-1, -2) / d**0.5, dim=-1)
        torch.testing.assert_close(out[g, 0], weights @ v_cat, rtol=1e-5, atol=1e-5)
        for s in range(1, 1 + supports):  # supports: plain self-attention
            torch.testing.assert_close(out[g, s], F.scaled_dot_product_attention(qe[g, s], ke[g, s], ve[g, s]))


@given(shape=episode_shapes, seed=seeds)
def test_kv_fusion_with_supports_identical_to_query_equals_attention_on_duplicated_sequence(shape, seed):
    groups, supports, heads, length, d = shape
    q, k, v = grouped_qkv(groups, 0, heads, length, d, seed)
    grouped = [x.repeat_interleave(1 + supports, dim=0) for x in (q, k, v)]  # every image = its query
    out = episodes(kv_fusion_attention(*grouped, supports), groups, supports)[:, 0]
    duplicated = F.scaled_dot_product_attention(q, k.repeat(1, 1, 1 + supports, 1), v.repeat(1, 1, 1 + supports, 1))
    torch.testing.assert_close(out, duplicated, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


@given(shape=episode_shapes, seed=seeds, data=st.data())
def test_kv_fusion_is_permutation_invariant_over_supports(shape, seed, data):
    groups, supports, heads, length, d = shape
    q, k, v = grouped_qkv(groups, supports, heads, length, d, seed)
    perm = data.draw(st.permutations(range(supports)))
    order = torch.tensor([0] + [1 + p for p in perm])
    permute = lambda x: episodes(x, groups, supports)[:, order].flatten(0, 1)  # noqa: E731
    out = kv_fusion_attention(q, k, v, supports)
    out_permuted = kv_fusion_attention(permute(q), permute(k), permute(v), supports)
    torch.testing.assert_close(out_permuted, permute(out), rtol=1e-5, atol=1e-5)


@given(shape=episode_shapes, seed=seeds, data=st.data())
def test_kv_fusion_padding_mask_makes_padded_supports_irrelevant(shape, seed, data):
    groups, supports, heads, length, d = shape
    row = st.lists(st.booleans(), min_size=supports, max_size=supports)
    mask = torch.tensor(data.draw(st.lists(row, min_size=groups, max_size=groups)))
    q, k, v = grouped_qkv(groups, supports, heads, length, d, seed)
    padded = torch.cat([torch.zeros(groups, 1, dtype=torch.bool), ~mask], dim=1).flatten()  # [B]
    k2, v2 = k.clone(), v.clone()
    k2[padded], v2[padded] = randn(int(padded.sum()), heads, length, d, seed=seed + 7) * 5, 0.0
    query = lambda x: episodes(x, groups, supports)[:, 0]  # noqa: E731
    out = query(kv_fusion_attention(q, k, v, supports, mask))
    torch.testing.assert_close(out, query(kv_fusion_attention(q, k2, v2, supports, mask)))
    # the same as dropping the padded supports from each episode
    for g in range(groups):
        keep = [0] + [1 + s for s in range(supports) if mask[g, s]]
        qe, ke, ve = (episodes(x, groups, supports)[g, keep] for x in (q, k, v))
        expected = kv_fusion_attention(qe, ke, ve, len(keep) - 1)[0]
        torch.testing.assert_close(out[g], expected, rtol=1e-5, atol=1e-5)


@given(shape=episode_shapes, seed=seeds)
def test_kv_fusion_subsample_with_one_valid_support_equals_one_shot(shape, seed):
    groups, supports, heads, length, d = shape
    supports += 1  # subsampling needs S >= 2
    q, k, v = grouped_qkv(groups, supports, heads, length, d, seed)
    mask = torch.zeros(groups, supports, dtype=torch.bool)
    mask[:, supports // 2] = True  # the L sampled tokens are exactly this support's
    got = kv_fusion_attention(q, k, v, supports, mask, subsample=True, generator=torch.Generator().manual_seed(seed))
    expected = kv_fusion_attention(q, k, v, supports, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_kv_fusion_subsample_draws_reproducibly_from_the_generator():
    q, k, v = grouped_qkv(2, 4, 2, 16, 8, seed=3)
    def run(seed):
        return kv_fusion_attention(q, k, v, 4, subsample=True, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    assert not torch.allclose(run(0), kv_fusion_attention(q, k, v, 4))  # attends to L of the 4L support tokens


def test_kv_fusion_subsample_compiles_without_graph_breaks_on_the_global_rng():
    q, k, v = grouped_qkv(2, 3, 2, 8, 4, seed=0)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    fn = lambda q, k, v: kv_fusion_attention(q, k, v, 3, mask, subsample=True)  # noqa: E731
    assert torch.compile(fn, fullgraph=True, backend="eager")(q, k, v).shape == q.shape


@pytest.mark.parametrize("which, hw", [("sd1", (8, 8)), ("sd2", (8, 8)), ("sd1", (9, 13))])
def test_kv_fusion_on_all_unet_self_attention_changes_queries_and_leaves_supports_plain(which, hw):
    unet, cfg = tiny_unet(which), {"sd1": TINY_SD1, "sd2": TINY_SD2}[which]
    groups, supports = 2, 2
    b = groups * (1 + supports)
    x, ctx, t = randn(b, 4, *hw), randn(b, 3, cfg.context_dim, seed=1), torch.arange(b) * 100
    procs = kv_fusion_procs(self_attention_layers(unet.attention_names), supports)
    with torch.no_grad():
        fused, plain = unet(x, t, ctx, procs=procs), unet(x, t, ctx)
    is_query = torch.arange(b) % (1 + supports) == 0
    torch.testing.assert_close(fused[~is_query], plain[~is_query], rtol=1e-5, atol=1e-5)
    assert (fused[is_query] - plain[is_query]).abs().amax() > 1e-3


def test_kv_fusion_rejects_bad_layouts_and_masks():
    q, k, v = grouped_qkv(2, 2, 1, 4, 4, seed=0)
    with pytest.raises(ValueError, match="episodes of 1 query \\+ 3 supports"):
        kv_fusion_attention(q, k, v, 3)
    with pytest.raises(TypeError, match="bool"):
        kv_fusion_attention(q, k, v, 2, torch.ones(2, 2))
    with pytest.raises(ValueError, match="shape \\[G, S=2\\]"):
        kv_fusion_attention(q, k, v, 2, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="1 episodes"):
        kv_fusion_attention(q, k, v, 2, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="Lq == Lk"):
        kv_fusion_attention(q, k[:, :, :2], v[:, :, :2], 2)
    with pytest.raises(ValueError, match="self-attention layers"):
        kv_fusion_procs(["down.0.attn.0.cross"], 1)
    with pytest.raises(ValueError, match=">= 0"):
        kv_fusion_procs(["down.0.attn.0.self"], -1)


# ------------------------------------------------------------------------ agent queries (QueryDiff)


@settings(max_examples=8)
@given(
    b=st.integers(1, 2),
    r=st.integers(1, 6),
    channels=st.lists(st.sampled_from([8, 16]), min_size=1, max_size=4),
    seed=seeds,
)
def test_agent_queries_have_documented_shapes_and_gradients_reach_q_init(b, r, channels, seed):
    torch.manual_seed(seed)
    dim, heads = 16, 2
    agent = AgentQueries(channels, num_queries=r, dim=dim, heads=heads)
    refine = AgentRefinement(channels=8, query_dim=dim, heads=heads)
    stages = [randn(b, c, 8 // 2**i, 4, seed=seed + i) for i, c in enumerate(channels)]
    q_agent = agent(stages)
    assert q_agent.shape == (b, r, dim)
    pixels = randn(b, 8, 6, 5, seed=seed + 9)
    refined = refine(pixels, q_agent)
    assert refined.shape == pixels.shape and refined.dtype == pixels.dtype
    refined.square().mean().backward()
    assert agent.q_init.grad is not None and agent.q_init.grad.abs().sum() > 0
    assert all(p.grad is not None for p in refine.parameters())


def test_agent_queries_treat_batch_rows_independently():
    torch.manual_seed(0)
    agent, refine = AgentQueries([8, 16], num_queries=4, dim=16, heads=2), AgentRefinement(8, 16, heads=2)
    stages, pixels = [randn(3, 8, 4, 4), randn(3, 16, 2, 2, seed=1)], randn(3, 8, 5, 5, seed=2)
    out = refine(pixels, agent(stages))
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(refine(pixels[perm], agent([s[perm] for s in stages])), out[perm])


def _randomise_(module, seed):
    """Random values in every parameter (LayerNorm affines and biases too: ones and zeros hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def layer_norm_reference(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def attention_reference(attn, x, context):
    """Multi-head attention written out head by head: softmax(Q_h K_hᵀ / √d) V_h, concatenated,
    output projection. x [Lq, dim], context [Lk, c] (one batch row)."""
    q = x @ attn.to_q.weight.T + attn.to_q.bias
    k = context @ attn.to_k.weight.T + attn.to_k.bias
    v = context @ attn.to_v.weight.T + attn.to_v.bias
    d = q.shape[-1] // attn.heads
    heads = []
    for h in range(attn.heads):
        qh, kh, vh = (t[:, h * d : (h + 1) * d] for t in (q, k, v))
        heads.append(torch.softmax(qh @ kh.T / math.sqrt(d), dim=-1) @ vh)
    return torch.cat(heads, -1) @ attn.to_out[0].weight.T + attn.to_out[0].bias


def agent_queries_reference(agent, stages):
    """The docstring's equations per batch row: q_l = Attn_l(q_init, LN_l(f_l)); m_1 = q_1,
    m_l = q_l + Attn'_l(q_init, LN'_l(m_{l-1})); q_agent = LN(m_N)."""
    out = []
    for b in range(stages[0].shape[0]):
        merged = None
        for i, f in enumerate(stages):
            tokens = f[b].flatten(1).T  # [h·w, C_l]
            q_stage = attention_reference(agent.stage_attns[i], agent.q_init, layer_norm_reference(tokens, agent.stage_norms[i]))
            if merged is None:
                merged = q_stage
            else:
                context = layer_norm_reference(merged, agent.merge_norms[i - 1])
                merged = q_stage + attention_reference(agent.merge_attns[i - 1], agent.q_init, context)
        out.append(layer_norm_reference(merged, agent.out_norm))
    return torch.stack(out)


def agent_refinement_reference(refine, pixels, queries):
    """F' = F + Attn(Q = LN(F), K = V = queries) over each image's h·w pixel tokens."""
    out = []
    for b in range(pixels.shape[0]):
        tokens = pixels[b].flatten(1).T  # [h·w, C]
        refined = tokens + attention_reference(refine.attn, layer_norm_reference(tokens, refine.norm), queries[b])
        out.append(refined.T.reshape(pixels.shape[1:]))
    return torch.stack(out)


def test_agent_queries_and_refinement_equal_the_written_out_attention():
    """Catches: no progressive merge (m_l = q_l, or the merge attending to q_l instead of m_{l-1}),
    no residual in the refinement, a missing 1/√d, LayerNorm on the wrong side. Measured max
    |error| 4.8e-7 on values up to 5 (SDPA against the explicit softmax)."""
    agent = _randomise_(AgentQueries([8, 4, 6], num_queries=5, dim=8, heads=2), 0)
    refine = _randomise_(AgentRefinement(channels=6, query_dim=8, heads=3), 1)
    stages = [randn(2, 8, 4, 4, seed=2), randn(2, 4, 2, 4, seed=3), randn(2, 6, 2, 2, seed=4)]
    pixels = randn(2, 6, 3, 5, seed=5)
    with torch.no_grad():
        q_agent = agent(stages)
        torch.testing.assert_close(q_agent, agent_queries_reference(agent, stages))  # float32 defaults
        torch.testing.assert_close(refine(pixels, q_agent), agent_refinement_reference(refine, pixels, q_agent))


def test_agent_modules_reject_wrong_shapes():
    agent, refine = AgentQueries([8, 16], num_queries=4, dim=16, heads=2), AgentRefinement(8, 16, heads=2)
    with pytest.raises(ValueError, match="expected 2 stage"):
        agent([randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match="stage 1 features must be \\[1, 16, h, w\\]"):
        agent([randn(1, 8, 4, 4), randn(1, 8, 2, 2)])
    with pytest.raises(ValueError, match="pixels must be"):
        refine(randn(1, 4, 4, 4), randn(1, 4, 16))
    with pytest.raises(ValueError, match="queries must be"):
        refine(randn(1, 8, 4, 4), randn(1, 4, 8))
    with pytest.raises(ValueError, match="at least one"):
        AgentQueries([])


# ------------------------------------------------------------------------ context slices (DiGSeg)


@given(
    b=st.integers(1, 3), heads=st.integers(1, 3), lq=st.integers(1, 9), lk=st.integers(2, 9), d=st.integers(1, 8),
    data=st.data(), seed=seeds,
)
def test_context_slice_equals_attention_on_the_sliced_context(b, heads, lq, lk, d, data, seed):
    start = data.draw(st.integers(0, lk - 1))
    stop = data.draw(st.integers(start + 1, lk))
    q, k, v = (randn(b, heads, n, d, seed=seed + i) for i, n in enumerate((lq, lk, lk)))
    proc = context_slice_procs(["x.cross"], start, stop)["x.cross"]
    expected = F.scaled_dot_product_attention(q, k[:, :, start:stop], v[:, :, start:stop])
    torch.testing.assert_close(proc(q, k, v, "x.cross"), expected)


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_context_slice_on_every_cross_layer_equals_the_unet_on_the_sliced_context(which):
    unet = tiny_unet(which)
    cfg = unet.config
    x, t = randn(2, cfg.in_channels, 8, 8, seed=1), torch.tensor([10, 900])
    context = randn(2, 7, cfg.context_dim, seed=2)
    procs = context_slice_procs(cross_attention_layers(unet.attention_names), 2, 5)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context, procs=procs), unet(x, t, context[:, 2:5]))


def test_context_slices_give_two_groups_of_layers_two_contexts():
    """Context [a ; b ; c]: the mid block sees a, the other cross layers b, nobody c."""
    unet = tiny_unet("sd2")
    cross = cross_attention_layers(unet.attention_names)
    mid = tuple(n for n in cross if n.startswith("mid."))
    procs = {**context_slice_procs([n for n in cross if n not in mid], 3, 7), **context_slice_procs(mid, 0, 3)}
    a, b, c = (randn(1, n, unet.config.context_dim, seed=n) for n in (3, 4, 2))
    x = randn(1, 4, 8, 8, seed=5)
    with torch.no_grad():
        out = unet(x, 3, torch.cat([a, b, c], 1), procs=procs)
        assert torch.equal(out, unet(x, 3, torch.cat([a, b, c + 1], 1), procs=procs))
        assert not torch.allclose(out, unet(x, 3, torch.cat([a + 1, b, c], 1), procs=procs))
        assert not torch.allclose(out, unet(x, 3, torch.cat([a, b + 1, c], 1), procs=procs))


def test_context_slice_rejects_bad_ranges_and_short_contexts():
    with pytest.raises(ValueError, match="start < stop"):
        context_slice_procs(["a.cross"], 3, 3)
    with pytest.raises(ValueError, match="start < stop"):
        context_slice_procs(["a.cross"], -1, 2)
    proc = context_slice_procs(["a.cross"], 0, 5)["a.cross"]
    q = k = v = randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="fewer than stop=5"):
        proc(q, k, v, "a.cross")
