import copy
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from unet_seg.hub_config import vision_from_transformers, vision_to_transformers
from unet_seg.models.clip_vision import (
    CLIP_MEAN,
    CLIP_STD,
    TINY_VIT,
    VIT_L14,
    CLIPVisionConfig,
    CLIPVisionEncoder,
    clip_preprocess,
)

from .helpers import perturb_, randn, rel_err

transformers = pytest.importorskip("transformers")

TINY_GELU = CLIPVisionConfig(
    image_size=28, patch_size=7, width=48, layers=3, heads=3, mlp_dim=96, projection_dim=24, act="gelu"
)


def reference(cfg: CLIPVisionConfig):
    """transformers' model with random values in every parameter, eager attention (another kernel than ours)."""
    t_cfg = transformers.CLIPVisionConfig(**vision_to_transformers(cfg))
    model = transformers.CLIPVisionModelWithProjection._from_config(t_cfg, attn_implementation="eager")
    return perturb_(model).eval()


@pytest.fixture(scope="module", params=[TINY_VIT, TINY_GELU], ids=["quick_gelu", "gelu"])
def pair(request):
    ref = reference(request.param)
    ours = CLIPVisionEncoder(request.param).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def pixels(b: int, cfg: CLIPVisionConfig, seed: int = 0) -> torch.Tensor:
    return randn(b, 3, cfg.image_size, cfg.image_size, seed=seed)


@pytest.mark.parametrize("b", [1, 3])
def test_outputs_equal_transformers_last_hidden_state_and_image_embeds(pair, b):
    ref, ours = pair
    x = pixels(b, ours.config, seed=b)
    with torch.no_grad():
        expected = ref(x)
        out = ours(x)
    cfg = ours.config
    assert out.patch_tokens.shape == (b, cfg.grid**2, cfg.width)
    assert out.image_embeds.shape == expected.image_embeds.shape == (b, cfg.projection_dim)
    # Measured against eager attention: at most 1.6e-7 for either output and activation.
    assert rel_err(out.patch_tokens, expected.last_hidden_state[:, 1:]) <= 1e-6
    assert rel_err(out.image_embeds, expected.image_embeds) <= 1e-6
    torch.testing.assert_close(out.image_embeds, expected.image_embeds, rtol=1e-5, atol=1e-5)


def test_project_of_patch_tokens_equals_transformers_head_on_patches(pair):
    ref, ours = pair
    x = pixels(2, ours.config, seed=5)
    with torch.no_grad():
        hidden = ref(x).last_hidden_state[:, 1:]
        expected = ref.visual_projection(ref.vision_model.post_layernorm(hidden))
        out = ours.project(ours(x).patch_tokens)
    assert rel_err(out, expected) <= 1e-6  # measured 1.7e-7


def test_loads_save_pretrained_file_strictly_and_matches(pair, tmp_path):
    ref, _ = pair
    ref.save_pretrained(tmp_path)
    cfg = vision_from_transformers(json.loads((tmp_path / "config.json").read_text()))
    ours = CLIPVisionEncoder(cfg)
    ours.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    x = pixels(2, cfg, seed=1)
    with torch.no_grad():
        assert rel_err(ours.eval()(x).image_embeds, ref(x).image_embeds) <= 1e-6  # measured 1.2e-7


def test_meta_built_model_loads_by_assignment_and_matches(pair):
    """Models are built on the meta device and loaded with assign=True: nothing may stay on meta."""
    ref, ours = pair
    with torch.device("meta"):
        lazy = CLIPVisionEncoder(ours.config)
    lazy.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert all(not t.is_meta for t in [*lazy.parameters(), *lazy.buffers()])
    x = pixels(1, ours.config, seed=2)
    with torch.no_grad():
        assert torch.equal(lazy.eval()(x).image_embeds, ours(x).image_embeds)


def test_vision_keys_of_a_full_clip_model_load_strictly(pair):
    """A full `CLIPModel` file (openai/clip-vit-large-patch14) holds our keys beside the text tower's."""
    _, ours = pair
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    full_cfg = transformers.CLIPConfig(
        text_config=text, vision_config=vision_to_transformers(ours.config), projection_dim=ours.config.projection_dim
    )
    full = transformers.CLIPModel(full_cfg).state_dict()
    vision = {k: v for k, v in full.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
    assert len(vision) < len(full)
    CLIPVisionEncoder(ours.config).load_state_dict(vision, strict=True)


def test_transformers_loads_our_state_dict_with_no_missing_or_unexpected_keys(pair, tmp_path):
    _, ours = pair
    save_file(ours.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(vision_to_transformers(ours.config)))
    ref, info = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = pixels(2, ours.config, seed=3)
    with torch.no_grad():
        assert rel_err(ours(x).image_embeds, ref.eval()(x).image_embeds) <= 1e-6  # measured 0.0


def test_model_has_no_buffers(pair):
    """Positions are computed: nothing non-persistent that a meta-device build would leave empty."""
    _, ours = pair
    assert not list(ours.buffers())


@pytest.mark.parametrize("cfg", [VIT_L14, TINY_VIT, TINY_GELU], ids=["vit_l14", "tiny", "tiny_gelu"])
def test_config_round_trips_through_transformers_dict(cfg):
    assert vision_from_transformers(vision_to_transformers(cfg)) == cfg
    t = transformers.CLIPVisionConfig(**vision_to_transformers(cfg))
    assert vision_from_transformers(t.to_dict()) == cfg


# `vision_config` of openai/clip-vit-large-patch14's config.json (fields describing the network)
# with the top-level projection_dim; the same values as an image encoder's own config.json.
VIT_L14_PUBLISHED = dict(model_type="clip_vision_model", hidden_act="quick_gelu", hidden_size=1024, image_size=224,
                         intermediate_size=4096, layer_norm_eps=1e-05, num_attention_heads=16, num_channels=3,
                         num_hidden_layers=24, patch_size=14, projection_dim=768, attention_dropout=0.0)  # fmt: skip


def test_published_vit_l14_config_gives_the_preset():
    assert vision_from_transformers(VIT_L14_PUBLISHED) == VIT_L14
    assert VIT_L14.grid == 16


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(hidden_act="gelu_new"), "act"),
        (dict(model_type="clip"), "model_type"),
        (dict(architectures=["CLIPVisionModel"]), "architectures"),
        (dict(num_channels=1), "num_channels"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(num_attention_heads=5), "divisible by heads"),
        (dict(image_size=225), "divisible by patch_size"),
    ],
)
def test_unsupported_transformers_settings_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        vision_from_transformers({**VIT_L14_PUBLISHED, **change})


def test_vit_l14_has_transformers_names_shapes_and_parameter_count():
    with torch.device("meta"):
        ours = CLIPVisionEncoder(VIT_L14)
        ref = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**vision_to_transformers(VIT_L14)))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 303_966_208


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return perturb_(CLIPVisionEncoder(TINY_VIT)).eval()


@given(
    b=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    input_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_outputs_have_documented_shapes_and_parameter_dtype(tiny, b, dtype, input_dtype):
    model = copy.deepcopy(tiny).to(dtype)
    with torch.no_grad():
        out = model(pixels(b, TINY_VIT).to(input_dtype))
    assert out.patch_tokens.shape == (b, 16, TINY_VIT.width) and out.patch_tokens.dtype == dtype
    assert out.image_embeds.shape == (b, TINY_VIT.projection_dim) and out.image_embeds.dtype == dtype
    assert torch.isfinite(out.patch_tokens).all() and torch.isfinite(out.image_embeds).all()


@given(b=st.integers(2, 4), i=st.integers(0, 3), seed=st.integers(0, 100))
def test_each_image_is_encoded_independently_of_the_batch(tiny, b, i, seed):
    i = i % b
    x = pixels(b, TINY_VIT, seed=seed)
    with torch.no_grad():
        batched, alone = tiny(x), tiny(x[i : i + 1])
    torch.testing.assert_close(batched.image_embeds[i : i + 1], alone.image_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.patch_tokens[i : i + 1], alone.patch_tokens, rtol=1e-5, atol=1e-5)


@given(row=st.integers(0, 3), col=st.integers(0, 3))
def test_patch_tokens_are_in_row_major_order(row, col):
    """With attention and MLPs switched off (zero weights), token r·grid + c sees only patch (r, c)."""
    model = CLIPVisionEncoder(TINY_VIT)
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            for p in (*layer.self_attn.out_proj.parameters(), *layer.mlp.fc2.parameters()):
                p.zero_()
        x = torch.zeros(1, 3, 32, 32)
        x[:, :, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 1.0
        changed = (model(x).patch_tokens - model(torch.zeros_like(x)).patch_tokens).abs().sum(-1)[0]
    assert changed.argmax().item() == row * 4 + col and (changed > 0).sum() == 1


@given(shape=st.lists(st.integers(1, 3), min_size=0, max_size=2))
def test_project_maps_last_axis_to_projection_dim(tiny, shape):
    tokens = randn(*shape, TINY_VIT.width)
    with torch.no_grad():
        out = tiny.project(tokens)
    assert out.shape == (*shape, TINY_VIT.projection_dim)


def test_gradients_reach_every_parameter_and_are_finite(tiny):
    x = pixels(2, TINY_VIT)
    tiny.zero_grad()
    out = tiny(x)
    (out.patch_tokens * randn(*out.patch_tokens.shape, seed=1)).sum().add(out.image_embeds.square().sum()).backward()
    for name, p in tiny.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    tiny.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "x, error",
    [
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError),
        (torch.zeros(3, 32, 32), ValueError),
        (torch.zeros(1, 4, 32, 32), ValueError),
        (torch.zeros(1, 3, 32, 40), ValueError),
        (torch.zeros(1, 3, 224, 224), ValueError),
    ],
    ids=["uint8", "3d", "4-channels", "not-square", "wrong-size"],
)
def test_malformed_pixels_are_refused(tiny, x, error):
    with pytest.raises(error, match=r"pixels"):
        tiny(x)


def test_tokens_of_wrong_width_are_refused_by_project(tiny):
    with pytest.raises(ValueError, match=r"\[\.\.\., 32\]"):
        tiny.project(torch.zeros(2, 5, 31))


@pytest.mark.parametrize(
    "change", [dict(act="relu"), dict(width=30, heads=4), dict(layers=0), dict(image_size=30, patch_size=8)]
)
def test_invalid_configs_are_refused(change):
    with pytest.raises(ValueError):
        CLIPVisionConfig(**change)


def test_compiles_to_one_graph_with_eager_outputs(tiny):
    x = pixels(2, TINY_VIT)
    compiled = torch.compile(tiny, fullgraph=True, backend="eager")
    with torch.no_grad():
        a, b = compiled(x), tiny(x)
    assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.patch_tokens, b.patch_tokens)


# clip_preprocess


@given(b=st.integers(1, 2), h=st.integers(1, 80), w=st.integers(1, 80), size=st.integers(1, 48))
def test_preprocess_gives_size_by_size_images(b, h, w, size):
    out = clip_preprocess(randn(b, 3, h, w).clamp(-1, 1), size=size)
    assert out.shape == (b, 3, size, size) and out.dtype == torch.float32


@given(size=st.integers(1, 40), seed=st.integers(0, 100))
def test_preprocess_of_a_size_by_size_image_is_only_the_normalisation(size, seed):
    img = randn(2, 3, size, size, seed=seed).clamp(-1, 1)
    expected = ((img + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip_preprocess(img, size=size), expected, rtol=0, atol=1e-5)


@given(h=st.integers(8, 64), w=st.integers(8, 64), value=st.floats(-1, 1))
def test_preprocess_of_a_constant_image_is_constant_per_channel(h, w, value):
    out = clip_preprocess(torch.full((1, 3, h, w), value), size=16)
    expected = ((value + 1) / 2 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out), rtol=0, atol=1e-5)


@settings(max_examples=10)
@given(h=st.integers(24, 64), w=st.integers(24, 64), seed=st.integers(0, 100))
def test_preprocess_is_close_to_transformers_clip_image_processor(h, w, seed):
    """Same resize, crop and normalisation as the PIL processor; they differ by PIL's bicubic kernel
    and 8-bit rounding (measured mean |difference| ~0.004); a crop one pixel off gives ~0.03."""
    smooth = F.interpolate(randn(1, 3, 4, 4, seed=seed), size=(h, w), mode="bilinear").tanh()
    uint8 = ((smooth + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20})
    image = uint8[0].permute(1, 2, 0).numpy()
    expected = torch.from_numpy(np.asarray(processor(images=image, return_tensors="np")["pixel_values"]))
    out = clip_preprocess(uint8.float() / 127.5 - 1, size=20)
    assert (out - expected).abs().mean() < 0.012 and rel_err(out, expected) < 0.015


@pytest.mark.parametrize(
    "img, error",
    [
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), TypeError),
        (torch.zeros(3, 8, 8), ValueError),
        (torch.zeros(1, 1, 8, 8), ValueError),
        (torch.zeros(1, 3, 0, 8), ValueError),
    ],
    ids=["uint8", "3d", "grey", "empty"],
)
def test_preprocess_refuses_malformed_images(img, error):
    with pytest.raises(error, match="img"):
        clip_preprocess(img)


# ------------------------------------------------------------------------ load_clip: both towers of a full CLIP file


@pytest.fixture(scope="module")
def full_clip(tmp_path_factory):
    """transformers' CLIPModel (tiny, random values everywhere) saved as safetensors, as on the hub."""
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, eos_token_id=2)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision_to_transformers(TINY_GELU), projection_dim=24)
    ref = perturb_(transformers.CLIPModel._from_config(cfg, attn_implementation="eager")).eval()
    folder = tmp_path_factory.mktemp("clip")
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def eos_ids(b: int, length: int, seed: int) -> torch.Tensor:
    """Random token ids with BOS first, an EOS (the largest id) at a random place and padding after it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49000, (b, length), generator=g)
    ids[:, 0] = 49406
    for row, end in zip(ids, torch.randint(1, length, (b,), generator=g).tolist()):
        row[end:] = 49407
    return ids


def test_load_clip_matches_transformers_text_and_image_features(full_clip):
    from unet_seg.pretrained import load_clip

    ref, folder = full_clip
    text, vision = load_clip(folder)
    ids, x = eos_ids(3, 9, seed=0), pixels(2, TINY_GELU, seed=4)
    with torch.no_grad():
        expected_text = ref.text_projection(ref.text_model(input_ids=ids).pooler_output)
        expected_image = ref.visual_projection(ref.vision_model(pixel_values=x).pooler_output)
        # measured 1.6e-7, 1.1e-7, 1.0e-7
        assert rel_err(text.text_embeds(ids), expected_text) <= 1e-6
        assert rel_err(vision(x).image_embeds, expected_image) <= 1e-6
        assert rel_err(text(ids), ref.text_model(input_ids=ids).last_hidden_state) <= 1e-6
    assert vision.config == TINY_GELU and text.text_projection.out_features == 24


def test_text_embeds_pool_at_the_first_eos_and_refuse_rows_without_one(full_clip):
    from unet_seg.pretrained import load_clip

    text, _ = load_clip(full_clip[1])
    ids = eos_ids(1, 9, seed=1)
    end = int((ids[0] == 49407).nonzero()[0])
    changed = ids.clone()
    changed[0, end + 1 :] = 0  # other padding after the first EOS: the pooled state is the same
    with torch.no_grad():
        torch.testing.assert_close(text.text_embeds(ids), text.text_embeds(changed))
    with pytest.raises(ValueError, match="EOS"):
        text.text_embeds(torch.full((1, 5), 7))


def test_load_clip_refuses_a_single_tower_folder(pair, tmp_path):
    from unet_seg.pretrained import load_clip

    ref, _ = pair
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="full CLIP"):
        load_clip(tmp_path)
