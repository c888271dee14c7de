import copy
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unet_seg.hub import CheckpointError
from unet_seg.hub_config import unet_from_diffusers, unet_to_diffusers

from .helpers import fake_hub_cache, perturb_, randn, rel_err
from unet_seg.models.unet import SD15, SD21, SD21_BASE, TINY_SD1, TINY_SD2, UNet, UNetConfig
from unet_seg.pretrained import from_pretrained

diffusers = pytest.importorskip("diffusers")


def diffusers_unet(cfg: UNetConfig, folder: Path, seed: int = 0, **save_kwargs):
    ref = perturb_(diffusers.UNet2DConditionModel(**unet_to_diffusers(cfg)), seed).eval()
    ref.save_pretrained(folder / "unet", safe_serialization=True, **save_kwargs)
    return ref


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request, tmp_path_factory):
    cfg = {"sd1": TINY_SD1, "sd2": TINY_SD2}[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    ref = diffusers_unet(cfg, folder)
    return cfg, ref, from_pretrained(UNet, folder)


@pytest.mark.parametrize("t", [[0, 0], [999, 999], [1, 500], [37.5, 801.0]])
def test_unet_matches_diffusers(pair, t):
    cfg, ref, ours = pair
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 16, 24, generator=g)
    ctx = torch.randn(2, 7, cfg.context_dim, generator=g)
    t = torch.tensor(t)
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert rel_err(got, expected) <= 1e-6  # measured 0.0 (the same float32 kernels as diffusers)


@pytest.mark.parametrize("t", [[0, 0], [37.5, 801.0]])
def test_unet_matches_diffusers_in_float64(pair, t):
    """In float64 rounding is ~1e-16, so a semantic slip of 1e-7 shows: the transformer GroupNorm's
    eps at 1e-5 instead of 1e-6 moves the output by 1.3e-7 to 1.9e-7 relative, under any float32
    bound, 1e6 times over this one. Measured: 0.0."""
    cfg, ref, ours = pair
    ref, ours = copy.deepcopy(ref).double(), copy.deepcopy(ours).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 16, 24, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 7, cfg.context_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(ours(x, torch.tensor(t), ctx), ref(x, torch.tensor(t), ctx).sample) <= 1e-12


ODD_SIZES = [(12, 20), (9, 16), (17, 11), (5, 3), (1, 1)]


@pytest.mark.parametrize("hw", ODD_SIZES)
def test_unet_matches_diffusers_at_latent_sizes_that_are_no_multiples_of_8(pair, hw):
    """Any latent size diffusers takes: each upsampler goes to the size of the skip it meets
    (diffusers' `upsample_size`), 17 -> 9 -> 5 -> 3 and back to 5, 9, 17. Measured on a CPU:
    0.0 in float32 and in float64 at every size here, SD1 and SD2."""
    cfg, ref, ours = pair
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.in_channels, *hw, generator=g)
    ctx = torch.randn(2, 7, cfg.context_dim, generator=g)
    t = torch.tensor([37.5, 801.0])
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
        assert got.shape == expected.shape == x.shape
        assert rel_err(got, expected) <= 1e-6  # measured 0.0
        ref64, ours64 = copy.deepcopy(ref).double(), copy.deepcopy(ours).double()
        x64, ctx64 = x.double(), ctx.double()
        assert rel_err(ours64(x64, t, ctx64), ref64(x64, t, ctx64).sample) <= 1e-12  # measured 0.0


def test_unet_compiles_without_graph_breaks_at_an_odd_latent_size(tiny):
    """The skip sizes come from tensor shapes, static under compile: no break, no Python branch
    on values."""
    x, ctx = randn(1, 4, 9, 7, seed=31), randn(1, 3, TINY_SD1.context_dim, seed=32)
    compiled = torch.compile(tiny, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, torch.tensor([10]), ctx), tiny(x, torch.tensor([10]), ctx))


def test_scalar_timestep_equals_broadcast_tensor(pair):
    cfg, _, ours = pair
    x, ctx = randn(3, 4, 8, 8, seed=12), randn(3, 5, cfg.context_dim, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 250, ctx), ours(x, torch.full((3,), 250), ctx))


@pytest.mark.parametrize("hw", [(16, 16), (17, 11), (12, 20)])
def test_named_features_are_diffusers_block_outputs(pair, hw):
    """Every tap name, at 16² and at latent sizes that are no multiples of 8 (odd sides too)."""
    cfg, ref, ours = pair
    x, ctx, t = randn(1, 4, *hw, seed=14), randn(1, 5, cfg.context_dim, seed=15), torch.tensor([400])
    captured = {}

    def keep(name, first_of_tuple=False):
        def hook(module, args, out):  # returns None: the block's output is left alone
            captured[name] = out[0] if first_of_tuple else out

        return hook

    hooks = [b.register_forward_hook(keep(f"down.{k}", True)) for k, b in enumerate(ref.down_blocks)]
    hooks += [b.register_forward_hook(keep(f"up.{k}")) for k, b in enumerate(ref.up_blocks)]
    hooks += [
        r.register_forward_hook(keep(f"up.{k}.res.{j}")) for k, b in enumerate(ref.up_blocks) for j, r in enumerate(b.resnets)
    ]
    hooks.append(ref.mid_block.register_forward_hook(keep("mid")))
    hooks.append(ref.conv_in.register_forward_hook(keep("conv_in")))
    hooks += [  # the residual branch is conv2's output (dropout 0, output scale 1)
        r.conv2.register_forward_hook(keep(f"up.{k}.res.{j}.branch"))
        for k, b in enumerate(ref.up_blocks) for j, r in enumerate(b.resnets)
    ]  # fmt: skip
    hooks += [
        a.transformer_blocks[0].register_forward_hook(keep(f"up.{k}.attn.{j}"))
        for k, b in enumerate(ref.up_blocks) for j, a in enumerate(getattr(b, "attentions", []))
    ]  # fmt: skip
    with torch.no_grad():
        ref(x, t, ctx)
        feats = ours.features(x, t, ctx, ours.feature_names)
    for h in hooks:
        h.remove()
    assert set(captured) == set(ours.feature_names)
    assert sum(".attn." in n for n in captured) == 9 and sum(n.endswith(".branch") for n in captured) == 12
    for name, expected in captured.items():
        if ".attn." in name:  # tokens [B, h·w, C] -> [B, C, h, w]
            res = feats[name.replace("attn", "res")]
            expected = expected.transpose(1, 2).reshape(res.shape)
        assert feats[name].shape == expected.shape, name
        assert rel_err(feats[name], expected) <= 1e-6, name  # measured 0.0


@pytest.mark.parametrize("hw", [(8, 16), (9, 13)])
def test_features_early_exit_equals_full_run(pair, hw):
    cfg, _, ours = pair
    x, ctx = randn(2, 4, *hw, seed=16), randn(2, 3, cfg.context_dim, seed=17)
    with torch.no_grad():
        full = ours.features(x, 10, ctx, ours.feature_names)
        for name in ours.feature_names:
            assert torch.equal(ours.features(x, 10, ctx, [name])[name], full[name])


def test_procs_replace_attention_of_named_layers_only(pair):
    cfg, _, ours = pair
    x, ctx = randn(1, 4, 8, 8, seed=18), randn(1, 3, cfg.context_dim, seed=19)
    seen = []

    def zero_attention(q, k, v, name):
        seen.append(name)
        return torch.zeros_like(q)

    target = "mid.attn.0.cross"
    with torch.no_grad():
        plain = ours(x, 5, ctx)
        patched = ours(x, 5, ctx, procs={target: zero_attention})
    assert seen == [target]
    assert not torch.allclose(plain, patched)
    assert target in ours.attention_names and len(set(ours.attention_names)) == len(ours.attention_names)


@pytest.mark.parametrize("cfg, params", [(SD15, 859_520_964), (SD21, 865_910_724), (SD21_BASE, 865_910_724)])
def test_presets_have_published_parameter_counts(cfg, params):
    with torch.device("meta"):
        assert sum(p.numel() for p in UNet(cfg).parameters()) == params


@pytest.mark.parametrize("cfg", [SD15, SD21, SD21_BASE, TINY_SD1, TINY_SD2])
def test_config_round_trips_through_diffusers_dict(cfg):
    assert unet_from_diffusers(unet_to_diffusers(cfg)) == cfg


def test_unsupported_diffusers_setting_is_refused():
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_from_diffusers({**unet_to_diffusers(SD15), "class_embed_type": "timestep"})


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UNet(TINY_SD1).eval()


@given(
    b=st.integers(1, 3),
    # any sides; one above 8 keeps the deepest level of TINY_SD1 (one channel per GroupNorm group)
    # above 1×1, where torch's group_norm refuses a batch of one, as diffusers' would
    hw=st.tuples(st.integers(9, 24), st.integers(1, 24)).flatmap(lambda hw: st.sampled_from([hw, hw[::-1]])),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    int_t=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_output_shape_and_dtype_follow_input(tiny, b, hw, dtype, int_t, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, *hw, generator=g).to(dtype)
    t = torch.randint(0, 1000, (b,), generator=g) if int_t else torch.rand(b, generator=g) * 999
    ctx = torch.randn(b, 4, TINY_SD1.context_dim, generator=g).to(dtype)
    model = copy.deepcopy(tiny).to(dtype)
    with torch.no_grad():
        out = model(x, t, ctx)
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()


def test_a_low_precision_unet_casts_its_inputs_in_and_answers_in_the_callers_dtype(tiny):
    x, ctx, t = randn(2, 4, 16, 16, seed=25), randn(2, 4, TINY_SD1.context_dim, seed=26), torch.tensor([10, 900])
    model = copy.deepcopy(tiny).to(torch.bfloat16)
    with torch.no_grad():
        out = model(x, t, ctx)  # float32 inputs, bf16 weights: no error, no cast by hand
        by_hand = model(x.bfloat16(), t, ctx.bfloat16())
        feats = model.features(x, t, ctx, ["mid"])
    assert out.dtype == torch.float32 and torch.equal(out, by_hand.float())
    assert feats["mid"].dtype == torch.bfloat16  # features stay in the compute dtype


def test_batch_elements_are_independent(tiny):
    # 16² latents: at 8² the deepest level is 1×1, where GroupNorm amplifies the batch-size-dependent
    # rounding of the convolutions to ~1e-2; a batch-mixing bug would give O(1) differences.
    x, ctx, t = randn(3, 4, 16, 16, seed=1), randn(3, 5, 32, seed=2), torch.tensor([3, 500, 900])
    with torch.no_grad():
        batched = tiny(x, t, ctx)
        single = torch.cat([tiny(x[i : i + 1], t[i : i + 1], ctx[i : i + 1]) for i in range(3)])
    assert rel_err(batched, single) <= 1e-5  # float32 summation order differs with batch size; measured 1.1e-6


def test_gradients_reach_every_parameter(tiny):
    x, ctx = randn(1, 4, 8, 8, seed=20).requires_grad_(), randn(1, 3, 32, seed=21)
    tiny.zero_grad()
    tiny(x, 100, ctx).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tiny.parameters())


@pytest.mark.parametrize(
    "x_shape, ctx_shape, t, match",
    [
        ((1, 3, 8, 8), (1, 3, 32), 1, "4, h, w"),
        ((1, 4, 8, 8), (1, 3, 64), 1, r"context must be \[1, L, 32\]"),
        ((2, 4, 8, 8), (1, 3, 32), 1, r"context must be \[2, L, 32\]"),
        ((2, 4, 8, 8), (2, 3, 32), torch.tensor([1, 2, 3]), r"t must be a scalar or have shape \[2\]"),
        ((4, 8, 8), (1, 3, 32), 1, "latents"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny, x_shape, ctx_shape, t, match):
    with pytest.raises(ValueError, match=match):
        tiny(randn(x_shape, seed=22), t, randn(ctx_shape, seed=23))


def test_integer_latents_are_refused(tiny):
    with pytest.raises(TypeError, match="floating-point"):
        tiny(torch.zeros(1, 4, 8, 8, dtype=torch.long), 1, randn(1, 3, 32, seed=24))


def test_unknown_feature_name_lists_valid_ones(tiny):
    with pytest.raises(ValueError, match="down.0"):
        tiny.features(randn(1, 4, 8, 8, seed=25), 1, randn(1, 3, 32, seed=26), ["decoder.9"])


def test_widened_conv_in_on_duplicated_input_equals_original(tiny):
    torch.manual_seed(3)
    model = UNet(TINY_SD1).eval()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32)
    with torch.no_grad():
        before = model(x, 7, ctx)
        model.widen_conv_in(8)
        after = model(torch.cat([x, x], dim=1), 7, ctx)
    assert model.config.in_channels == 8
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 8"):
        model.widen_conv_in(12)


def test_support_conv_in_starts_as_mean_of_pretrained_conv_over_image_and_mask():
    """DiffewS' conv_in_ref: [W, W]/2 with the pretrained bias; conv_in itself stays as it was."""
    torch.manual_seed(3)
    model = UNet(TINY_SD1)
    before = {k: v.clone() for k, v in model.conv_in.state_dict().items()}
    model.add_support_conv_in(8)
    z_img, z_mask = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        got = model.conv_in_support(torch.cat([z_img, z_mask], dim=1))
        expected = (model.conv_in(z_img) + model.conv_in(z_mask)) / 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(model.conv_in.state_dict()[k], v) for k, v in before.items())
    assert model.config.in_channels == 4 and "conv_in_support.weight" in model.state_dict()
    with pytest.raises(ValueError, match="multiple of 4"):
        model.add_support_conv_in(6)


def test_support_rows_use_the_support_conv_and_the_others_the_pretrained_conv():
    torch.manual_seed(4)
    model = UNet(TINY_SD1).eval().add_support_conv_in(8)
    with torch.no_grad():
        model.conv_in_support.weight.normal_()  # as after training: no longer the mean of conv_in's
    x, ctx = torch.randn(3, 8, 12, 10), torch.randn(3, 3, 32)  # 10 -> 5 -> 3 -> 2: odd sides on the way
    support = torch.tensor([False, True, True])
    as_support = copy.deepcopy(model)
    as_support.conv_in = as_support.conv_in_support
    as_support.config = UNetConfig(**{**TINY_SD1.__dict__, "in_channels": 8})
    with torch.no_grad():
        out = model(x, 7, ctx, support=support)
        query_alone = model(x[:1, :4], 7, ctx[:1])  # the query's mask channels are never read
        supports_alone = as_support(x[1:], 7, ctx[1:])
    torch.testing.assert_close(out[:1], query_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:], supports_alone, rtol=1e-5, atol=1e-5)
    model(x, 7, ctx, support=support).sum().backward()
    assert model.conv_in.weight.grad.abs().sum() > 0 and model.conv_in_support.weight.grad.abs().sum() > 0


def test_support_rows_are_checked():
    model = UNet(TINY_SD1)
    x, ctx = randn(2, 8, 8, 8, seed=27), randn(2, 3, 32, seed=28)
    with pytest.raises(ValueError, match="add_support_conv_in"):
        model(x, 1, ctx, support=torch.tensor([False, True]))
    model.add_support_conv_in(8)
    with pytest.raises(ValueError, match="bool tensor"):
        model(x, 1, ctx, support=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[B, 8, h, w\]"):
        model(x[:, :4], 1, ctx, support=torch.tensor([False, True]))
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        model(x, 1, ctx)  # without support rows the U-Net takes conv_in's 4 channels


# --- loading -------------------------------------------------------------------------------


def test_sharded_checkpoint_loads(tmp_path):
    ref = diffusers_unet(TINY_SD2, tmp_path, max_shard_size="1MB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = from_pretrained(UNet, tmp_path)
    for name, p in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], p), name


def test_dtype_argument_casts_weights(tmp_path):
    diffusers_unet(TINY_SD1, tmp_path)
    ours = from_pretrained(UNet, tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in ours.parameters())


def test_mismatched_checkpoint_names_missing_unexpected_and_shapes(tmp_path):
    diffusers_unet(TINY_SD1, tmp_path)
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    sd = load_file(path)
    sd.pop("conv_out.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["conv_in.weight"] = torch.zeros(32, 8, 3, 3)
    save_file(sd, path)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(UNet, tmp_path)
    msg = str(e.value)
    assert "conv_out.bias" in msg and "extra.weight" in msg and "conv_in.weight: checkpoint (32, 8, 3, 3)" in msg


def test_truncated_file_names_the_file(tmp_path):
    diffusers_unet(TINY_SD1, tmp_path)
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors: corrupt or truncated"):
        from_pretrained(UNet, tmp_path)


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"cross_attention_dim": 32}')
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="refusing a pickle"):
        from_pretrained(UNet, tmp_path)


def test_missing_folder_is_not_mistaken_for_a_repo(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        from_pretrained(UNet, str(tmp_path / "nope" / "deeper"))


def test_hub_repo_id_loads_offline_from_cache_with_pinned_revision(tmp_path, monkeypatch):
    ref = diffusers_unet(TINY_SD1, tmp_path / "src")
    unet_dir = tmp_path / "src" / "unet"
    cache = tmp_path / "cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    fake_hub_cache(
        cache,
        "someone/tiny-sd",
        {f"unet/{p.name}": p for p in unet_dir.iterdir()},
        commit,
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    for revision in (None, commit):
        ours = from_pretrained(UNet, "someone/tiny-sd", revision=revision)
        torch.testing.assert_close(ours.state_dict()["conv_in.weight"], ref.state_dict()["conv_in.weight"])
    with pytest.raises(CheckpointError, match="not in the local cache"):
        from_pretrained(UNet, "someone/other-model")


@pytest.mark.slow
def test_full_sd21_unet_matches_diffusers(tmp_path):
    """The real SD 2.1 architecture (random weights), one 32×32-latent forward."""
    ref = diffusers_unet(SD21, tmp_path)
    ours = from_pretrained(UNet, tmp_path)
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 1024, generator=g), torch.tensor([321])
    with torch.no_grad():
        err = rel_err(ours(x, t, ctx), ref(x, t, ctx).sample)
    assert err <= 1e-6  # measured 0.0


@pytest.mark.parametrize("hw", [(8, 16), (11, 6)])
def test_forward_with_features_is_the_full_output_and_the_same_features(pair, hw):
    cfg, _, ours = pair
    x, ctx = randn(2, 4, *hw, seed=29), randn(2, 3, cfg.context_dim, seed=30)
    names = ["up.1.attn.0", "up.0.res.1.branch"]
    with torch.no_grad():
        out, feats = ours.forward_with_features(x, 10, ctx, names)
        assert torch.equal(out, ours(x, 10, ctx))
        expected = ours.features(x, 10, ctx, names)
    assert set(feats) == set(names) and all(torch.equal(feats[n], expected[n]) for n in names)


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SD2], ids=["sd1", "sd2"])
def test_feature_info_reports_the_channels_and_stride_of_every_feature_a_forward_returns(config):
    unet = UNet(config).eval()
    with torch.no_grad():
        feats = unet.features(randn(1, 4, 16, 21, seed=5), 10, randn(1, 3, config.context_dim, seed=6), unet.feature_names)
    for name, f in feats.items():
        c, s = unet.feature_info(name)
        assert tuple(f.shape[1:]) == (c, -(-16 // s), -(-21 // s)), name  # ceil-halved at each level
    with pytest.raises(ValueError, match="unknown feature name"):
        unet.feature_info("up.9")


def test_feature_info_of_sd_at_512_matches_the_documented_shapes():
    with torch.device("meta"):
        unet = UNet(SD21)
    assert unet.feature_info("up.1") == (1280, 2) and unet.feature_info("up.2") == (640, 1)
    assert unet.feature_info("up.2.res.0") == (640, 2) and unet.feature_info("mid") == (1280, 8)
    assert unet.feature_info("down.0") == (320, 2) and unet.feature_info("conv_in") == (320, 1)
