
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_seg.attention import kv_fusion_procs, self_attention_layers
from unet_seg.diffusion import NoiseSchedule, q_sample
from unet_seg.models.unet import TINY_SD1, TINY_SD2
from unet_seg.taps import fuse_by_masks, timestep_features

from .helpers import rand, randn, rel_err, tiny_unet

CONFIGS = {"sd1": TINY_SD1, "sd2": TINY_SD2}
SCHEDULE = NoiseSchedule.sd()
seeds = st.integers(0, 2**31 - 1)


def inputs(which, b, h=8, w=8, seed=0):
    return randn(b, 4, h, w, seed=seed), randn(b, 3, CONFIGS[which].context_dim, seed=seed + 1)


@given(
    which=st.sampled_from(["sd1", "sd2"]),
    b=st.integers(1, 2),
    ts=st.lists(st.integers(0, 999), min_size=1, max_size=3),
    names=st.lists(
        st.sampled_from(["conv_in", "down.1", "mid", "up.0", "up.2", "up.3"]), min_size=1, max_size=3, unique=True
    ),
    seed=seeds,
)
def test_timesteps_in_one_call_equal_separate_per_timestep_forwards(which, b, ts, names, seed):
    unet = tiny_unet(which)
    z0, ctx = inputs(which, b, 16, 16, seed=seed)
    noise = randn(b, len(ts), 4, 16, 16, seed=seed + 2)
    with torch.no_grad():
        got = timestep_features(unet, z0, ts, ctx, names, schedule=SCHEDULE, noise=noise)
        for k, t in enumerate(ts):
            t_b = torch.full((b,), t)
            x_t = q_sample(z0, noise[:, k], t_b, SCHEDULE)
            expected = unet.features(x_t, t_b, ctx, names)
            for n in names:
                assert got[n].shape[:2] == (b, len(ts))
                # batch-size-dependent conv kernels differ in rounding; GroupNorm amplifies it
                assert rel_err(got[n][:, k], expected[n]) <= 1e-5


def test_kv_fusion_episodes_stay_whole_at_every_stacked_timestep():
    unet = tiny_unet("sd2")
    z0, ctx = inputs("sd2", 4, 16, 16)  # two episodes of query + 1 support
    noise = randn(4, 3, 4, 16, 16, seed=2)
    procs = kv_fusion_procs(self_attention_layers(unet.attention_names), num_supports=1)
    ts = [20, 400, 900]
    with torch.no_grad():
        got = timestep_features(unet, z0, ts, ctx, ["up.2"], schedule=SCHEDULE, noise=noise, procs=procs)
        plain = timestep_features(unet, z0, ts, ctx, ["up.2"], schedule=SCHEDULE, noise=noise)
        for k, t in enumerate(ts):
            t_b = torch.full((4,), t)
            expected = unet.features(q_sample(z0, noise[:, k], t_b, SCHEDULE), t_b, ctx, ["up.2"], procs)["up.2"]
            assert rel_err(got["up.2"][:, k], expected) <= 1e-5
    assert rel_err(got["up.2"][0::2], plain["up.2"][0::2]) > 1e-3  # queries see their supports


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_early_exit_features_equal_the_full_runs_and_skip_deeper_blocks(which):
    unet = tiny_unet(which)
    z0, ctx = inputs(which, 2)
    noise = randn(2, 2, 4, 8, 8, seed=5)
    called = set()

    def recording(q, k, v, name):
        called.add(name)
        return F.scaled_dot_product_attention(q, k, v)

    procs = {n: recording for n in unet.attention_names}
    kwargs = dict(schedule=SCHEDULE, noise=noise, procs=procs)
    with torch.no_grad():
        early = timestep_features(unet, z0, [10, 700], ctx, ["down.1"], **kwargs)
        assert called and not any(n.startswith(("mid", "up")) for n in called)
        full = timestep_features(unet, z0, [10, 700], ctx, list(unet.feature_names), **kwargs)
    assert any(n.startswith("up.3") for n in called)
    torch.testing.assert_close(early["down.1"], full["down.1"])


def test_timestep_features_run_one_batched_unet_forward(monkeypatch):
    unet = tiny_unet("sd1")
    batches = []
    original = unet.features
    monkeypatch.setattr(unet, "features", lambda x, *a, **kw: batches.append(x.shape[0]) or original(x, *a, **kw))
    z0, ctx = inputs("sd1", 3)
    with torch.no_grad():
        out = timestep_features(unet, z0, [1, 2, 3, 4], ctx, ["up.1"], schedule=SCHEDULE)
    assert batches == [12] and out["up.1"].shape[:2] == (3, 4)


@given(which=st.sampled_from(["sd1", "sd2"]), b=st.integers(1, 2), k=st.integers(1, 3), seed=seeds)
def test_attention_maps_sum_to_one_over_tokens_and_equal_a_manual_softmax(which, b, k, seed):
    unet = tiny_unet(which)
    z0, ctx = inputs(which, b, h=16, w=8, seed=seed)
    noise = randn(b, k, 4, 16, 8, seed=seed + 2)
    layer = "up.2.attn.1.cross"  # level 1: a (16/2)×(8/2) grid
    recorded = {}

    def recording(q, k_, v, name):
        recorded["q"], recorded["k"] = q, k_
        return F.scaled_dot_product_attention(q, k_, v)

    ts = [999 - 300 * i for i in range(k)]
    with torch.no_grad():
        kwargs = dict(schedule=SCHEDULE, noise=noise)
        out = timestep_features(unet, z0, ts, ctx, ["up.2"], attention_maps=[layer], **kwargs)
        timestep_features(unet, z0, ts, ctx, ["up.2"], procs={layer: recording}, **kwargs)
    maps = out[layer]
    assert maps.shape == (b, k, 3, 8, 4)
    torch.testing.assert_close(maps.sum(2), torch.ones(b, k, 8, 4))
    q, k_ = recorded["q"], recorded["k"]
    manual = torch.softmax(q @ k_.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)  # [K·B, 32, 3]
    expected = manual.transpose(1, 2).reshape(k, b, 3, 8, 4).transpose(0, 1)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)


def test_attention_maps_alone_stop_after_their_block():
    unet = tiny_unet("sd2")
    z0, ctx = inputs("sd2", 1)
    with torch.no_grad():
        out = timestep_features(unet, z0, [500], ctx, [], schedule=SCHEDULE, attention_maps=["down.1.attn.0.cross"])
    assert list(out) == ["down.1.attn.0.cross"] and out["down.1.attn.0.cross"].shape == (1, 1, 3, 4, 4)


def test_shared_noise_broadcasts_over_timesteps_and_generator_draws_reproducibly():
    unet = tiny_unet("sd1")
    z0, ctx = inputs("sd1", 2)
    eps = randn(2, 1, 4, 8, 8, seed=4)

    def run(**kw):
        return timestep_features(unet, z0, [100, 600], ctx, ["mid"], schedule=SCHEDULE, **kw)["mid"]

    with torch.no_grad():
        torch.testing.assert_close(run(noise=eps), run(noise=eps.expand(2, 2, 4, 8, 8).clone()))
        a, b = run(generator=torch.Generator().manual_seed(0)), run(generator=torch.Generator().manual_seed(0))
        c = run(generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_context_of_batch_one_is_shared_by_all_samples():
    unet = tiny_unet("sd1")
    z0, ctx = inputs("sd1", 3)
    noise = randn(3, 1, 4, 8, 8, seed=1)
    with torch.no_grad():
        shared = timestep_features(unet, z0, [300], ctx[:1], ["up.1"], schedule=SCHEDULE, noise=noise)
        tiled = timestep_features(
            unet, z0, [300], ctx[:1].expand(3, -1, -1), ["up.1"], schedule=SCHEDULE, noise=noise
        )
    torch.testing.assert_close(shared["up.1"], tiled["up.1"])


def test_timestep_features_compile_without_graph_breaks():
    unet = tiny_unet("sd2")
    z0, ctx = inputs("sd2", 1)
    noise = randn(1, 2, 4, 8, 8, seed=3)
    t = torch.tensor([50, 800])

    def taps(z0, ctx, noise):
        return timestep_features(
            unet, z0, t, ctx, ["up.1"], schedule=SCHEDULE, noise=noise, attention_maps=["up.1.attn.0.cross"]
        )

    with torch.no_grad():
        compiled = torch.compile(taps, fullgraph=True, backend="eager")(z0, ctx, noise)
        eager = taps(z0, ctx, noise)
    assert set(compiled) == set(eager)
    for n in eager:
        torch.testing.assert_close(compiled[n], eager[n])


def test_timestep_features_reject_bad_inputs():
    unet = tiny_unet("sd1")
    z0, ctx = inputs("sd1", 2)
    run = lambda *a, **kw: timestep_features(unet, *a, schedule=SCHEDULE, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="z0 must be"):
        run(z0[0], [1], ctx, ["mid"])
    with pytest.raises(TypeError, match="timesteps"):
        run(z0, [0.5], ctx, ["mid"])
    with pytest.raises(TypeError, match="timesteps"):
        run(z0, [], ctx, ["mid"])
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        run(z0, [1000], ctx, ["mid"])
    with pytest.raises(ValueError, match="context must be"):
        run(z0, [1], ctx.repeat(2, 1, 1), ["mid"])
    with pytest.raises(ValueError, match="noise must broadcast"):
        run(z0, [1, 2], ctx, ["mid"], noise=randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="unknown feature names"):
        run(z0, [1], ctx, ["up.9"])
    with pytest.raises(ValueError, match="unknown attention layers"):
        run(z0, [1], ctx, ["mid"], attention_maps=["up.1.attn.9.cross"])
    with pytest.raises(ValueError, match="choose one"):
        run(z0, [1], ctx, [], attention_maps=["mid.attn.0.cross"], procs={"mid.attn.0.cross": None})
    with pytest.raises(ValueError, match="at least one"):
        run(z0, [1], ctx, [])


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2), p=st.integers(1, 4), k=st.integers(1, 3), scale=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**31 - 1)
)
def test_fuse_by_masks_is_a_per_pixel_weighted_mean_over_prompts(b, p, k, scale, seed):
    h = w = 4
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p, k, 3, h, w, generator=g)
    masks = (torch.rand(b, p, h * scale, w * scale, generator=g) > 0.5).float()
    masks[:, 0] = 1.0  # the global prompt covers every pixel
    out = fuse_by_masks(x, masks)
    assert out.shape == (b, k, 3, h, w)
    m = torch.nn.functional.avg_pool2d(masks, scale) if scale > 1 else masks
    expected = (m[:, :, None, None] * x).sum(1) / m.sum(1)[:, None, None]
    torch.testing.assert_close(out, expected)
    # a mean: within the per-pixel min and max over prompts
    assert (out <= x.max(1).values + 1e-6).all() and (out >= x.min(1).values - 1e-6).all()


def test_fuse_by_masks_with_one_prompt_or_equal_inputs_returns_them_and_passes_gradients():
    x = randn(2, 1, 5, 4, 4).requires_grad_()
    out = fuse_by_masks(x, torch.ones(2, 1, 8, 8))
    torch.testing.assert_close(out, x[:, 0])
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    same = randn(1, 1, 3, 4, 4, seed=1).expand(1, 3, 3, 4, 4)
    masks = rand(1, 3, 4, 4, seed=2)
    torch.testing.assert_close(fuse_by_masks(same, masks), same[:, 0])
    assert fuse_by_masks(x.detach().half(), torch.ones(2, 1, 4, 4)).dtype == torch.float16


def test_fuse_by_masks_uncovered_pixels_are_zero_and_bad_shapes_are_refused():
    out = fuse_by_masks(torch.ones(1, 2, 3, 2, 2), torch.zeros(1, 2, 2, 2))
    assert torch.equal(out, torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="same B, P"):
        fuse_by_masks(torch.ones(1, 2, 3, 2, 2), torch.ones(1, 3, 2, 2))


# ---------------------------------------------------------------------------------------------
# DIFF's official trajectory: stochastic DDIM inversion with per-step mask fusion

STEPS = [(0, 1), (1, 5), (5, 20), (20, 60), (60, 120), (120, 160)]
ETAS = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
SAVE = [3, 1, 0]  # high noise first, as DIFF's save_timestep
PLAIN, SUMMED = ["up.1.res.0.branch", "up.3.res.2.branch"], ["up.1.attn.0", "up.3.attn.2"]


def official_reference(unet, z0, empty, prompts, steps, etas, save, g, prediction_type, seed):
    """DIFF's generalized_steps written out step by step, one image at a time, with its explicit
    rows [negative "", prompt "", class prompts...]; noise drawn per step for all rows at once."""
    gen = torch.Generator().manual_seed(seed)
    rows = [1 + len(p) for p in prompts]
    noises = [torch.randn(sum(rows), *z0.shape[1:], generator=gen) if eta else None for eta in etas]
    out = {n: [] for n in PLAIN + SUMMED}
    for b, image_prompts in enumerate(prompts):
        x = z0[b : b + 1]
        texts = torch.cat([empty, empty] + [c for c, _ in image_prompts])
        masks = torch.stack([torch.ones(z0.shape[-2:])] + [m for _, m in image_prompts])[:, None]
        p = len(masks)
        kept = {n: [] for n in out}
        for i, ((t, t_next), eta) in enumerate(zip(steps, etas)):
            if i > max(save):
                break
            eps, feats = unet.forward_with_features(x.repeat(p + 1, 1, 1, 1), t, texts, PLAIN + SUMMED)
            if i in save:
                for n in PLAIN:
                    kept[n].append((i, feats[n][:1]))
                for n in SUMMED:
                    kept[n].append((i, feats[n].sum(0, keepdim=True)))
            e_un = eps[:1].repeat(p, 1, 1, 1)
            e = e_un + g * (eps[1:] - e_un)
            xs = x.repeat(p, 1, 1, 1)
            a, a_next = SCHEDULE.alphas_cumprod[t].double(), SCHEDULE.alphas_cumprod[t_next].double()
            if prediction_type == "v_prediction":
                e = (1 - a).sqrt() * xs + a.sqrt() * e
            x0 = (xs - (1 - a).sqrt() * e) / a.sqrt()
            c1 = eta * ((1 - a_next / a) * (1 - a_next) / (1 - a)).sqrt()
            c2 = torch.clamp((1 - a_next) - c1**2, min=1e-10).sqrt()
            z = noises[i][sum(rows[:b]) : sum(rows[: b + 1])] if eta else 0.0
            xs_next = (a_next.sqrt() * x0 + c1 * z + c2 * e).float()
            count = masks.sum(0)
            x = torch.where(count > 0, (xs_next * masks).sum(0) / count, (xs_next * masks).sum(0))[None]
        for n in out:
            out[n].append(torch.stack([f for _, f in sorted(kept[n], key=lambda s: save.index(s[0]))], 1))
    return {n: torch.cat(v) for n, v in out.items()}


@pytest.mark.parametrize(
    "which, prediction_type, hw",
    [("sd1", "epsilon", (16, 16)), ("sd1", "v_prediction", (16, 16)), ("sd2", "epsilon", (16, 16)),
     ("sd2", "v_prediction", (16, 16)), ("sd1", "v_prediction", (17, 11)), ("sd2", "epsilon", (12, 20))],
)  # fmt: skip
def test_trajectory_features_equal_the_official_step_by_step_reference(which, prediction_type, hw):
    """Also at latents with sides that are no multiples of 8 (BDD100K's and ACDC's, scaled down)."""
    from unet_seg.taps import inversion_trajectory_features

    unet, d = tiny_unet(which), CONFIGS[which].context_dim
    z0 = randn(2, 4, *hw, seed=3)
    empty, c1, c2 = randn(1, 5, d, seed=4), randn(1, 5, d, seed=5), randn(1, 5, d, seed=6)
    m1 = torch.zeros(hw)
    m1[: hw[0] // 2] = 1
    m2 = torch.zeros(hw)
    m2[hw[0] * 5 // 8 :, hw[1] // 4 :] = 1
    prompts = [[(c1, m1), (c2, m2)], []]  # image 0: the conditional branch with two classes; image 1: unconditional
    with torch.no_grad():
        expected = official_reference(unet, z0, empty, prompts, STEPS, ETAS, SAVE, 5.0, prediction_type, seed=7)
        got = inversion_trajectory_features(
            unet, z0, torch.tensor([0, 0, 0, 1]), torch.cat([empty, c1, c2, empty]),
            torch.stack([torch.ones(hw), m1, m2, torch.ones(hw)]), PLAIN, SUMMED,
            steps=STEPS, etas=ETAS, save_steps=SAVE, schedule=NoiseSchedule.sd(prediction_type), guidance_scale=5.0,
            generator=torch.Generator().manual_seed(7),
        )  # fmt: skip
        with_negative = inversion_trajectory_features(
            unet, z0, torch.tensor([0, 0, 0, 1]), torch.cat([empty, c1, c2, empty]),
            torch.stack([torch.ones(hw), m1, m2, torch.ones(hw)]), PLAIN, SUMMED,
            steps=STEPS, etas=ETAS, save_steps=SAVE, schedule=NoiseSchedule.sd(prediction_type), guidance_scale=5.0, negative=empty.expand(2, -1, -1),
            generator=torch.Generator().manual_seed(7),
        )  # fmt: skip
    for n in PLAIN + SUMMED:
        assert got[n].shape == expected[n].shape == (2, len(SAVE), *expected[n].shape[2:]), n
        assert rel_err(got[n], expected[n]) <= 1e-5, (n, rel_err(got[n], expected[n]))
        assert rel_err(with_negative[n], expected[n]) <= 1e-5, n
    # the noise and the class paths matter: another seed or no class prompts change the features
    assert rel_err(got["up.3.attn.2"][:, 0], got["up.3.attn.2"][:, 2]) > 1e-3


def test_trajectory_class_prompts_reach_the_negative_row_only_through_the_trajectory():
    """Path control changes the plain (negative-row) features only at steps after the first
    (the fused latent differs from then on), and only where the guided class paths moved it."""
    from unet_seg.taps import inversion_trajectory_features

    unet, d = tiny_unet("sd2"), TINY_SD2.context_dim
    z0, empty, c1 = randn(1, 4, 16, 16, seed=1), randn(1, 5, d, seed=2), randn(1, 5, d, seed=3)
    kwargs = dict(steps=STEPS, etas=ETAS, save_steps=[0, 3], schedule=SCHEDULE, guidance_scale=5.0)
    with torch.no_grad():
        plain = inversion_trajectory_features(
            unet, z0, torch.tensor([0]), empty, torch.ones(1, 16, 16), PLAIN,
            generator=torch.Generator().manual_seed(0), **kwargs,
        )  # fmt: skip
        guided = inversion_trajectory_features(
            unet, z0, torch.tensor([0, 0]), torch.cat([empty, c1]), torch.ones(2, 16, 16), PLAIN,
            generator=torch.Generator().manual_seed(0), **kwargs,
        )  # fmt: skip
    n = PLAIN[0]
    torch.testing.assert_close(guided[n][:, 0], plain[n][:, 0])  # step 0 sees the clean latent
    assert rel_err(guided[n][:, 1], plain[n][:, 1]) > 1e-3


def test_trajectory_refuses_rows_that_do_not_cover_every_image():
    from unet_seg.taps import inversion_trajectory_features

    unet = tiny_unet("sd1")
    with pytest.raises(ValueError, match="every one of the 2 trajectories"):
        inversion_trajectory_features(
            unet, randn(2, 4, 8, 8), torch.tensor([0, 0]), randn(2, 3, TINY_SD1.context_dim), torch.ones(2, 8, 8), PLAIN,
            steps=STEPS, etas=ETAS, save_steps=[1], schedule=SCHEDULE, guidance_scale=1.0,
        )  # fmt: skip


@given(b=st.integers(1, 3), p=st.integers(1, 3), seed=seeds)
def test_fuse_rows_equals_fuse_by_masks_on_a_rectangular_layout(b, p, seed):
    from unet_seg.taps import fuse_rows

    x, masks = randn(b, p, 2, 4, 4, seed=seed), (randn(b, p, 8, 8, seed=seed + 1) > 0).float()
    rows = torch.arange(b).repeat_interleave(p)
    torch.testing.assert_close(fuse_rows(x.flatten(0, 1), rows, masks.flatten(0, 1), b), fuse_by_masks(x, masks))


@given(b=st.integers(1, 3), k=st.integers(1, 4), c=st.integers(1, 5))
def test_fold_timesteps_puts_timestep_k_in_channels_k_c_to_k_c_plus_c(b, k, c):
    from unet_seg.taps import fold_timesteps

    feats = randn(b, k, c, 3, 2, seed=b + k + c)
    folded = fold_timesteps(feats)
    assert folded.shape == (b, k * c, 3, 2)
    for t in range(k):
        assert torch.equal(folded[:, t * c : (t + 1) * c], feats[:, t])
    with pytest.raises(ValueError, match=r"\[B, K, C, h, w\]"):
        fold_timesteps(feats[:, 0])
