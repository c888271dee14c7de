"""unet_seg.latent_cache: posteriors encoded once read back as the VAE computes them, samples
drawn from them are `encode(sample=True)`'s, a cache of another VAE, size or a corrupt shard is
refused, an interrupted build resumes, and two processes split the shards between them."""

import os
import socket

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unet_seg.hub import weights_fingerprint
from unet_seg.latent_cache import LatentCacheError, build_latent_cache, open_latent_cache, sample_latent, shard_of
from unet_seg.models import TINY_VAE, AutoencoderKL

SIZE = (16, 24)
KEYS = [f"image/{i:03d}" for i in range(7)]


def image(key: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(key.split("/")[1]))
    return torch.rand(3, *SIZE, generator=g) * 2 - 1


def tiny_vae(seed: int = 0, dtype=torch.float32) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(TINY_VAE).eval().to(dtype)


class Counting:
    """`image` that records the keys it loaded."""

    def __init__(self):
        self.keys = []

    def __call__(self, key):
        self.keys.append(key)
        return image(key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_cache_holds_the_posteriors_the_vae_computes(tmp_path, dtype, batch_size):
    """In the VAE's dtype; bit for bit where built one image per VAE call, as encoded here,
    else to the float rounding of batched convolutions (fp32 measured 5.2e-7 of the largest
    value at batch 3; bf16 0)."""
    vae = tiny_vae(dtype=dtype)
    cache = build_latent_cache(tmp_path, vae, KEYS, image, size=SIZE, batch_size=batch_size, shards=4)
    assert len(cache) == len(KEYS) and all(k in cache for k in KEYS)
    assert {p.name for p in tmp_path.iterdir()} == {f"shard_{shard_of(k, 4):04d}.safetensors" for k in KEYS}
    with torch.no_grad():
        for k in KEYS:
            got, expected = cache.get(k), vae.posterior(image(k)[None])[0]
            assert got.dtype == dtype and got.shape == (2, 4, SIZE[0] // 8, SIZE[1] // 8)
            if batch_size == 1:
                assert torch.equal(got, expected), k
            else:
                assert (got - expected).abs().max() <= 4e-6 * expected.abs().max(), k
    assert torch.equal(open_latent_cache(tmp_path, vae, SIZE, shards=4, keys=KEYS).get(KEYS[0]), cache.get(KEYS[0]))


def test_encode_samples_with_sample_latent_of_the_posterior():
    """`encode(sample=True)` is `sample_latent(posterior)`: the cached step's draw under the same ε."""
    vae, img = tiny_vae(), torch.rand(2, 3, *SIZE) * 2 - 1
    with torch.no_grad():
        a = vae.encode(img, sample=True, generator=torch.Generator().manual_seed(3))
        b = sample_latent(vae.posterior(img), torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and torch.equal(vae.encode(img), vae.posterior(img)[:, 0])
        assert not torch.equal(a, vae.encode(img))  # σ > 0: a sample is not the mean


@given(
    lead=st.lists(st.integers(1, 3), max_size=2), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    mean=st.floats(-3, 3), std=st.floats(0.05, 2), seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_sample_latent_draws_mean_plus_std_times_normal_noise(lead, dtype, mean, std, seed):
    """Shape [..., C, h, w] of a posterior [..., 2, C, h, w], its dtype and device; over 16384
    draws the sample mean and standard deviation are μ and σ (5 standard errors)."""
    c, h, w = 4, 64, 64
    post = torch.stack([torch.full((*lead, c, h, w), mean), torch.full((*lead, c, h, w), std)], dim=-4).to(dtype)
    z = sample_latent(post, torch.Generator().manual_seed(seed))
    assert z.shape == (*lead, c, h, w) and z.dtype == dtype and z.device == post.device
    x = z.double().flatten()[: c * h * w]
    m, s = post[(0,) * len(lead)][0, 0, 0, 0].double(), post[(0,) * len(lead)][1, 0, 0, 0].double()
    n = x.numel()
    assert abs(x.mean() - m) <= 5 * s / n**0.5 + abs(m) * 2**-7  # bf16 rounds the sum μ + σ·ε
    assert abs(x.std() / s - 1) <= 5 / (2 * n) ** 0.5 + 2**-6
    g = torch.Generator().manual_seed(seed)
    assert torch.equal(z, post.unbind(-4)[0] + post.unbind(-4)[1] * torch.randn(z.shape, generator=g, dtype=dtype))


def test_a_cache_of_other_vae_weights_another_size_or_a_corrupt_shard_is_refused(tmp_path):
    vae = tiny_vae()
    build_latent_cache(tmp_path, vae, KEYS, image, size=SIZE, shards=4)
    other = tiny_vae(seed=1)
    with pytest.raises(LatentCacheError, match=f"VAE weights sha256 {weights_fingerprint(vae.state_dict(), type(vae).__name__)}, this run has {weights_fingerprint(other.state_dict(), type(other).__name__)}"):
        build_latent_cache(tmp_path, other, KEYS, image, size=SIZE, shards=4)
    with pytest.raises(LatentCacheError, match="VAE weights sha256"):  # the same weights in bf16 encode otherwise
        open_latent_cache(tmp_path, tiny_vae(dtype=torch.bfloat16), SIZE, shards=4)
    with pytest.raises(LatentCacheError, match="image size 16x24, this run has 24x16"):
        open_latent_cache(tmp_path, vae, (24, 16), shards=4)
    with pytest.raises(LatentCacheError, match="shard count 4, this run has 8"):
        open_latent_cache(tmp_path, vae, SIZE, shards=8)
    with pytest.raises(LatentCacheError, match=r"2 posterior\(s\) missing"):
        open_latent_cache(tmp_path, vae, SIZE, shards=4, keys=KEYS + ["image/100", "image/101"])
    shard = sorted(tmp_path.glob("shard_*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    with pytest.raises(LatentCacheError, match=f"{shard.name}: corrupt or truncated latent cache shard"):
        build_latent_cache(tmp_path, vae, KEYS, image, size=SIZE, shards=4)
    shard.write_bytes(b"\x00" * 64)
    with pytest.raises(LatentCacheError, match="corrupt or truncated"):
        open_latent_cache(tmp_path, vae, SIZE, shards=4)


def test_an_interrupted_build_encodes_only_what_is_missing(tmp_path):
    vae = tiny_vae()
    first, second = Counting(), Counting()
    build_latent_cache(tmp_path, vae, KEYS[:4], first, size=SIZE, shards=4)
    cache = build_latent_cache(tmp_path, vae, KEYS, second, size=SIZE, shards=4)
    assert sorted(first.keys) == KEYS[:4] and sorted(second.keys) == KEYS[4:]
    fresh = build_latent_cache(tmp_path / "fresh", vae, KEYS, image, size=SIZE, shards=4)
    assert all(torch.equal(cache.get(k), fresh.get(k)) for k in KEYS)
    build_latent_cache(tmp_path, vae, KEYS, second, size=SIZE, shards=4)
    assert len(second.keys) == 3  # nothing left to encode


def test_a_non_finite_posterior_is_refused_and_nothing_of_it_stored(tmp_path):
    vae = tiny_vae()
    with pytest.raises(FloatingPointError, match="'image/002'"):
        build_latent_cache(tmp_path, vae, KEYS, lambda k: image(k) * (float("nan") if k == "image/002" else 1), size=SIZE, shards=1)
    assert not list(tmp_path.glob("shard_*"))
    with pytest.raises(ValueError, match=r"gave an image \(3, 8, 8\)"):
        build_latent_cache(tmp_path, vae, KEYS, lambda k: image(k)[:, :8, :8], size=SIZE)


def _rank_builds(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)  # as the test process (conftest): the same kernels, the same bits
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loads = Counting()
        cache = build_latent_cache(folder, tiny_vae(), KEYS, loads, size=SIZE, batch_size=1, shards=4)
        torch.save({"loaded": loads.keys, "cache": {k: cache.get(k) for k in KEYS}}, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_encode_disjoint_shards_and_read_the_same_cache(tmp_path):
    """Rank r encodes the keys of the shards i with i mod 2 = r, none twice; both ranks then read
    every posterior, equal to a one-process build's (one image per VAE call: bit for bit)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_builds, args=(2, port, str(tmp_path / "cache")), nprocs=2)
    ranks = [torch.load(tmp_path / "cache" / f"rank{r}.pt") for r in (0, 1)]
    for r, got in enumerate(ranks):
        assert all(shard_of(k, 4) % 2 == r for k in got["loaded"]), (r, got["loaded"])
    assert sorted(ranks[0]["loaded"] + ranks[1]["loaded"]) == KEYS
    assert ranks[0]["loaded"] and ranks[1]["loaded"]  # both ranks had work (a fixed property of KEYS)
    one = build_latent_cache(tmp_path / "one", tiny_vae(), KEYS, image, size=SIZE, batch_size=1, shards=4)
    for got in ranks:
        assert all(torch.equal(got["cache"][k], one.get(k)) for k in KEYS)
