import copy
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unet_seg.hub import CheckpointError
from unet_seg.hub_config import vae_from_diffusers, vae_to_diffusers
from unet_seg.models.vae import SD_VAE, TINY_VAE, AutoencoderKL
from unet_seg.pretrained import from_pretrained

from .helpers import perturb_, rand, randn, rel_err

diffusers = pytest.importorskip("diffusers")

# Four levels with SD's block layout but narrow; a second shape with 2 resnets per level as in SD.
SD_SHAPED = replace(SD_VAE, channels=(32, 64, 64, 64))


@pytest.fixture(scope="module", params=[TINY_VAE, SD_SHAPED], ids=["tiny", "sd-shaped"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    ref = perturb_(diffusers.AutoencoderKL(**vae_to_diffusers(request.param))).eval()
    ref.save_pretrained(folder / "vae")
    return request.param, ref, from_pretrained(AutoencoderKL, folder)


@pytest.mark.parametrize("hw", [(32, 32), (24, 40), (72, 56), (8, 8), (8, 136)])
def test_encode_returns_scaled_posterior_mean_of_diffusers(pair, hw):
    """Every image side that is a multiple of 8, odd latent sides included (72×56 -> 9×7)."""
    cfg, ref, ours = pair
    img = rand(2, 3, *hw, seed=0) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(img).latent_dist.mean * cfg.scaling_factor
        assert rel_err(ours.encode(img), expected) <= 1e-6  # measured <= 2.0e-7


@pytest.mark.parametrize("hw", [(3, 5), (9, 7), (1, 1), (1, 17)])
def test_decode_takes_scaled_latent_like_diffusers(pair, hw):
    cfg, ref, ours = pair
    z = randn(2, 4, *hw, seed=0)
    with torch.no_grad():
        assert rel_err(ours.decode(z), ref.decode(z / cfg.scaling_factor).sample) <= 2e-6  # measured <= 6.6e-7


@pytest.mark.parametrize("hw", [(24, 40), (72, 56)])
def test_encode_and_decode_match_diffusers_in_float64(pair, hw):
    """float64 rounding (~1e-16) exposes slips that float32 bounds cannot: the attention block's
    GroupNorm eps at 1e-5 instead of 1e-6 passes the float32 tests above. Measured: <= 1.4e-15."""
    cfg, ref, ours = pair
    ref, ours = copy.deepcopy(ref).double(), copy.deepcopy(ours).double()
    img = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    z = torch.randn(2, 4, hw[0] // 8, hw[1] // 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(ours.encode(img), ref.encode(img).latent_dist.mean * cfg.scaling_factor) <= 1e-12
        assert rel_err(ours.decode(z), ref.decode(z / cfg.scaling_factor).sample) <= 1e-12, hw


def test_sampling_uses_generator_and_posterior_std(pair):
    cfg, ref, ours = pair
    img = rand(1, 3, 16, 16, seed=12) * 2 - 1
    with torch.no_grad():
        a = ours.encode(img, sample=True, generator=torch.Generator().manual_seed(5))
        b = ours.encode(img, sample=True, generator=torch.Generator().manual_seed(5))
        dist = ref.encode(img).latent_dist
        eps = randn(dist.mean.shape, seed=5)
    assert torch.equal(a, b)
    assert rel_err(a, (dist.mean + dist.std * eps) * cfg.scaling_factor) <= 1e-6  # measured 0.0


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoencoderKL(TINY_VAE).eval()


@given(
    b=st.integers(1, 2), h=st.integers(1, 4), w=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_shapes_and_dtype_follow_input(tiny, b, h, w, dtype, seed):
    img = (torch.rand(b, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)
    with torch.no_grad():
        z = tiny.encode(img)
        out = tiny.decode(z)
    assert z.shape == (b, 4, h, w) and z.dtype == dtype
    assert out.shape == img.shape and out.dtype == dtype


def test_float32_vae_stays_float32_under_bf16_autocast(tiny):
    img = rand(1, 3, 16, 16, seed=13) * 2 - 1
    with torch.no_grad():
        plain = tiny.encode(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = tiny.encode(img.bfloat16())
    assert autocast.dtype == torch.bfloat16
    # Only the input and output roundings to bf16 differ, not a bf16 network.
    torch.testing.assert_close(autocast.float(), plain, rtol=2e-2, atol=2e-2)


def test_bf16_vae_does_not_switch_autocast_on():
    vae = AutoencoderKL(TINY_VAE).bfloat16().eval()
    seen = []
    hook = vae.encoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    with torch.no_grad():
        z = vae.encode(rand(1, 3, 16, 16, seed=14).bfloat16())
    hook.remove()
    assert seen == [False] and z.dtype == torch.bfloat16


def test_gradients_flow_through_decode(tiny):
    z = randn(1, 4, 2, 2, seed=15).requires_grad_()
    tiny.decode(z).square().mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call, shape, match",
    [
        ("encode", (1, 3, 12, 16), "multiples of 8"),
        ("encode", (1, 1, 16, 16), r"\[B, 3, H, W\]"),
        ("decode", (1, 3, 2, 2), r"\[B, 4, H, W\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny, call, shape, match):
    with pytest.raises(ValueError, match=match):
        getattr(tiny, call)(torch.zeros(shape))


@pytest.mark.parametrize("cfg", [SD_VAE, TINY_VAE, SD_SHAPED])
def test_config_round_trips_through_diffusers_dict(cfg):
    assert vae_from_diffusers(vae_to_diffusers(cfg)) == cfg


def test_sd_vae_has_published_parameter_count():
    with torch.device("meta"):
        assert sum(p.numel() for p in AutoencoderKL(SD_VAE).parameters()) == 83_653_863


def test_unsupported_vae_setting_is_refused():
    with pytest.raises(ValueError, match="shift_factor"):
        vae_from_diffusers({**vae_to_diffusers(SD_VAE), "shift_factor": 0.1159})


def test_vae_checkpoint_with_wrong_latent_width_names_the_shapes(tmp_path):
    ref = diffusers.AutoencoderKL(**vae_to_diffusers(replace(TINY_VAE, latent_channels=8)))
    ref.save_pretrained(tmp_path / "vae")
    config = (tmp_path / "vae" / "config.json").read_text().replace('"latent_channels": 8', '"latent_channels": 4')
    (tmp_path / "vae" / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match="post_quant_conv.weight: checkpoint"):
        from_pretrained(AutoencoderKL, tmp_path)
