import copy
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from unet_seg.hub_config import text_from_transformers, text_to_transformers
from unet_seg.models.clip import SD1_TEXT, SD2_TEXT, TINY_SD1_TEXT, TINY_SD2_TEXT, CLIPTextConfig, CLIPTextEncoder

from .helpers import perturb_, rel_err

transformers = pytest.importorskip("transformers")

PRESETS = [SD1_TEXT, SD2_TEXT, TINY_SD1_TEXT, TINY_SD2_TEXT]
BOS, EOS = 49406, 49407


def hub_names(state_dict: dict) -> dict:
    """transformers >= 5 drops the `text_model.` prefix of published SD text encoders (and adds it
    back when loading); ours keeps the published names."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}


def prompt_ids(b: int, n: int, seed: int = 0) -> torch.Tensor:
    """BOS, random tokens, EOS at the end, as a tokenizer would produce them."""
    ids = torch.randint(0, BOS, (b, n), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = BOS
    ids[:, -1] = EOS
    return ids


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    """A relative-error bound and an elementwise one (quick GELU with 1.7 in place of 1.702 stays
    under 1e-4 relative error but not under 1e-5 elementwise). Measured: 0.0 for every caller."""
    assert rel_err(out, expected) <= 1e-6
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=[TINY_SD1_TEXT, TINY_SD2_TEXT], ids=["sd1-shaped", "sd2-shaped"])
def pair(request):
    cfg = request.param
    ref = perturb_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_to_transformers(cfg)))).eval()
    ours = CLIPTextEncoder(cfg).eval()
    ours.load_state_dict(hub_names(ref.state_dict()), strict=True)
    return ref, ours


@pytest.mark.parametrize("b, n", [(1, 1), (2, 7), (3, 77)])
def test_output_equals_transformers_last_hidden_state(pair, b, n):
    ref, ours = pair
    ids = prompt_ids(b, n)
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
        out = ours(ids)
    assert out.shape == expected.shape == (b, n, ours.config.width)
    assert_matches(out, expected)


def test_loads_save_pretrained_file_strictly_and_matches(pair, tmp_path):
    ref, _ = pair
    ref.save_pretrained(tmp_path)
    ours = CLIPTextEncoder(text_from_transformers(json.loads((tmp_path / "config.json").read_text())))
    ours.load_state_dict(hub_names(load_file(tmp_path / "model.safetensors")), strict=True)
    ids = prompt_ids(2, 77, seed=1)
    with torch.no_grad():
        assert_matches(ours.eval()(ids), ref(ids).last_hidden_state)


def test_transformers_loads_our_state_dict_with_no_missing_or_unexpected_keys(pair, tmp_path):
    """Our names are the published hub layout: transformers reads them as a checkpoint of its own."""
    _, ours = pair
    save_file(ours.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(text_to_transformers(ours.config)))
    ref, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = prompt_ids(2, 30, seed=2)
    with torch.no_grad():
        assert_matches(ours(ids), ref.eval()(ids).last_hidden_state)


@pytest.mark.parametrize("cfg", PRESETS)
def test_config_round_trips_through_transformers_dict(cfg):
    assert text_from_transformers(text_to_transformers(cfg)) == cfg
    t = transformers.CLIPTextConfig(**text_to_transformers(cfg))
    assert text_from_transformers(t.to_dict()) == cfg


# The fields of the published `text_encoder/config.json` of SD 1.4/1.5 and SD 2.1 that describe the network.
SD1_PUBLISHED = dict(architectures=["CLIPTextModel"], model_type="clip_text_model", attention_dropout=0.0, dropout=0.0,
                     hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, layer_norm_eps=1e-05,
                     max_position_embeddings=77, num_attention_heads=12, num_hidden_layers=12, projection_dim=768,
                     vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1)  # fmt: skip
SD2_PUBLISHED = dict(SD1_PUBLISHED, hidden_act="gelu", hidden_size=1024, intermediate_size=4096,
                     num_attention_heads=16, num_hidden_layers=23, projection_dim=512)  # fmt: skip


def test_published_sd_configs_give_the_presets():
    assert text_from_transformers(SD1_PUBLISHED) == SD1_TEXT
    assert text_from_transformers(SD2_PUBLISHED) == SD2_TEXT


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(hidden_act="gelu_new"), "act"),
        (dict(model_type="clip"), "model_type"),
        (dict(architectures=["CLIPTextModelWithProjection"]), "architectures"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(num_attention_heads=5), "divisible"),
    ],
)
def test_unsupported_transformers_settings_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        text_from_transformers({**SD1_PUBLISHED, **change})


@pytest.mark.parametrize("cfg, params", [(SD1_TEXT, 123_060_480), (SD2_TEXT, 340_387_840)], ids=["sd1", "sd2"])
def test_full_size_presets_have_transformers_names_shapes_and_parameter_count(cfg, params):
    with torch.device("meta"):
        ours = CLIPTextEncoder(cfg)
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_to_transformers(cfg)))
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in hub_names(ref.state_dict()).items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == params


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return perturb_(CLIPTextEncoder(TINY_SD2_TEXT)).eval()


@given(
    b=st.integers(1, 3),
    n=st.integers(1, 77),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    id_dtype=st.sampled_from([torch.int64, torch.int32]),
)
def test_output_is_batch_by_length_by_width_in_parameter_dtype(tiny, b, n, dtype, id_dtype):
    ids = prompt_ids(b, n).to(id_dtype)
    model = copy.deepcopy(tiny).to(dtype)
    with torch.no_grad():
        out = model(ids)
    assert out.shape == (b, n, TINY_SD2_TEXT.width) and out.dtype == dtype
    assert torch.isfinite(out).all()


@given(data=st.data())
def test_changing_token_j_leaves_earlier_positions_unchanged(tiny, data):
    n = data.draw(st.integers(2, 77))
    j = data.draw(st.integers(1, n - 1))
    ids = prompt_ids(2, n, seed=data.draw(st.integers(0, 100)))
    changed = ids.clone()
    changed[:, j] = (ids[:, j] + data.draw(st.integers(1, 1000))) % BOS
    with torch.no_grad():
        a, b = tiny(ids), tiny(changed)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, j], b[:, j])


def test_gradients_reach_every_parameter_and_are_finite(tiny):
    ids = prompt_ids(2, 12)
    weights = torch.randn(2, 12, TINY_SD2_TEXT.width, generator=torch.Generator().manual_seed(0))
    tiny.zero_grad()
    (tiny(ids) * weights).sum().backward()
    for name, p in tiny.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    tiny.zero_grad(set_to_none=True)


@given(n=st.integers(78, 200))
def test_sequences_longer_than_max_positions_are_refused(tiny, n):
    with pytest.raises(ValueError, match="L <= 77"):
        tiny(torch.zeros(1, n, dtype=torch.long))


@given(bad=st.one_of(st.integers(-(2**40), -1), st.integers(TINY_SD2_TEXT.vocab_size, 2**40)), pos=st.integers(0, 9))
def test_ids_outside_vocabulary_are_refused(tiny, bad, pos):
    ids = prompt_ids(1, 10)
    ids[0, pos] = bad
    with pytest.raises(ValueError, match=r"\[0, 49408\)"):
        tiny(ids)


@pytest.mark.parametrize(
    "ids, error",
    [
        (torch.zeros(1, 5), TypeError),
        (torch.zeros(1, 5, dtype=torch.bool), TypeError),
        (torch.zeros(5, dtype=torch.long), ValueError),
        (torch.zeros(1, 2, 5, dtype=torch.long), ValueError),
        (torch.zeros(1, 0, dtype=torch.long), ValueError),
    ],
    ids=["float", "bool", "1d", "3d", "empty"],
)
def test_malformed_ids_are_refused(tiny, ids, error):
    with pytest.raises(error, match="ids"):
        tiny(ids)


@pytest.mark.parametrize("change", [dict(act="relu"), dict(width=30, heads=4), dict(layers=0)])
def test_invalid_configs_are_refused(change):
    with pytest.raises(ValueError):
        CLIPTextConfig(**change)


def test_compiles_to_one_graph_with_eager_outputs(tiny):
    ids = prompt_ids(2, 9)
    compiled = torch.compile(tiny, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(ids), tiny(ids))
