import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_seg.diffusion import (
    PREDICTION_TYPES,
    SPACINGS,
    NoiseSchedule,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ensemble_mean,
    eps_from_v,
    eps_from_x0,
    multires_noise,
    predict_x0,
    q_sample,
    training_target,
    v_from_x0_eps,
    x0_and_eps,
    x0_from_eps,
    x0_from_v,
)

from .helpers import rel_err

diffusers = pytest.importorskip("diffusers")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
T = 1000

timesteps = st.integers(0, T - 1)
prediction_types = st.sampled_from(PREDICTION_TYPES)
seeds = st.integers(0, 2**31 - 1)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def full_t(t: int, b: int) -> torch.Tensor:
    return torch.full((b,), t, dtype=torch.long)


def oracle(x0: torch.Tensor, eps: torch.Tensor, schedule: NoiseSchedule):
    """A perfect network: returns the true target for x_t on the trajectory of (x0, eps)."""
    return lambda x, t: training_target(x0, eps, t, schedule)


# ---- schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
@pytest.mark.parametrize("reference", ["DDPMScheduler", "DDIMScheduler"])
def test_alphas_cumprod_equal_diffusers(kind, reference):
    ref = getattr(diffusers, reference)(**{**SD, "beta_schedule": kind}, prediction_type="v_prediction")
    ours = NoiseSchedule.from_config(dict(ref.config))  # the full config, extra keys included
    assert ours.alphas_cumprod.dtype == ref.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert ours.prediction_type == "v_prediction" and ours.num_train_timesteps == 1000


def test_sd_preset_is_scaled_linear_from_config():
    sd = NoiseSchedule.sd("v_prediction")
    assert torch.equal(sd.alphas_cumprod, NoiseSchedule.from_config(SD).alphas_cumprod)
    assert sd.prediction_type == "v_prediction" and NoiseSchedule.from_config(SD).prediction_type == "epsilon"
    assert sd.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085)
    assert sd.alphas_cumprod[-1].item() == pytest.approx(0.0047, rel=0.01)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({**SD, "beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
        ({**SD, "trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({**SD, "rescale_betas_zero_snr": True}, "zero"),
        ({**SD, "prediction_type": "flow"}, "prediction_type"),
    ],
)
def test_from_config_rejects_unsupported_schedules(bad, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_config(bad)


def test_schedule_rejects_malformed_alphas():
    with pytest.raises(TypeError, match="alphas_cumprod"):
        NoiseSchedule(torch.ones(2, 3))
    with pytest.raises(ValueError, match="non-increasing"):
        NoiseSchedule(torch.tensor([0.5, 0.9]))


# ---- forward process and parameterisations -------------------------------------------------


@given(seed=seeds)
def test_q_sample_at_t0_returns_x0_up_to_first_beta(seed):
    x0, noise = randn(3, 4, 8, 8, seed=seed), randn(3, 4, 8, 8, seed=seed + 1)
    a = NoiseSchedule.sd().alphas_cumprod
    x = q_sample(x0, noise, full_t(0, 3), NoiseSchedule(a))
    bound = (1 - a[0].sqrt()) * x0.abs() + (1 - a[0]).sqrt() * noise.abs() + 1e-6
    assert ((x - x0).abs() <= bound).all() and (x - x0).abs().max() < 0.05 * (x0.abs().max() + noise.abs().max())
    assert torch.equal(q_sample(x0, noise, full_t(0, 3), NoiseSchedule(torch.ones(T))), x0)  # ᾱ = 1: exactly x0


@given(t=timesteps, seed=seeds)
def test_q_sample_of_zero_has_variance_one_minus_alpha_bar(t, seed):
    a = NoiseSchedule.sd().alphas_cumprod
    noise = randn(4, 4, 64, 64, seed=seed)
    x = q_sample(torch.zeros_like(noise), noise, full_t(t, 4), NoiseSchedule(a))
    n = noise.numel()
    assert x.var().item() == pytest.approx(1 - a[t].item(), rel=6 * math.sqrt(2 / n))


@given(t=st.lists(timesteps, min_size=2, max_size=4), seed=seeds)
def test_q_sample_equals_diffusers_add_noise_per_sample(t, seed):
    ref = diffusers.DDPMScheduler(**SD)
    x0, noise, t = randn(len(t), 4, 6, 6, seed=seed), randn(len(t), 4, 6, 6, seed=seed + 1), torch.tensor(t)
    ours = q_sample(x0, noise, t, NoiseSchedule.from_config(SD))
    assert rel_err(ours, ref.add_noise(x0, noise, t)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_q_sample_preserves_dtype_and_device(dtype):
    x0 = randn(2, 4, 5, 7, dtype=dtype)
    x = q_sample(x0, randn(2, 4, 5, 7, seed=1, dtype=dtype), torch.tensor([3, 900]), NoiseSchedule.sd())
    assert x.dtype == dtype and x.device == x0.device and x.shape == x0.shape


@given(t=timesteps)
def test_q_sample_gradients_are_sqrt_alpha_bar_and_sqrt_one_minus(t):
    a = NoiseSchedule.sd().alphas_cumprod.double()
    x0 = randn(2, 3, 4, dtype=torch.float64).requires_grad_()
    noise = randn(2, 3, 4, seed=1, dtype=torch.float64).requires_grad_()
    q_sample(x0, noise, full_t(t, 2), NoiseSchedule(a)).sum().backward()
    assert torch.allclose(x0.grad, a[t].sqrt().expand_as(x0))
    assert torch.allclose(noise.grad, (1 - a[t]).sqrt().expand_as(noise))


@given(t=st.lists(timesteps, min_size=1, max_size=3), seed=seeds)
def test_eps_v_x0_conversions_are_mutual_inverses(t, seed):
    schedule = NoiseSchedule(NoiseSchedule.sd().alphas_cumprod.double())
    b, t = len(t), torch.tensor(t)
    x0, eps = randn(b, 4, 5, 5, seed=seed, dtype=torch.float64), randn(b, 4, 5, 5, seed=seed + 1, dtype=torch.float64)
    x_t = q_sample(x0, eps, t, schedule)
    v = v_from_x0_eps(x0, eps, t, schedule)
    for got, want in [
        (x0_from_eps(x_t, eps, t, schedule), x0),
        (eps_from_x0(x_t, x0, t, schedule), eps),
        (x0_from_v(x_t, v, t, schedule), x0),
        (eps_from_v(x_t, v, t, schedule), eps),
        (v_from_x0_eps(x0_from_v(x_t, v, t, schedule), eps_from_v(x_t, v, t, schedule), t, schedule), v),
    ]:
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


@given(t=timesteps, kind=prediction_types, seed=seeds)
def test_x0_and_eps_of_the_true_target_are_x0_and_noise(t, kind, seed):
    schedule = NoiseSchedule.sd(kind)
    x0, eps = randn(2, 4, 6, 6, seed=seed), randn(2, 4, 6, 6, seed=seed + 1)
    tt = full_t(t, 2)
    x_t = q_sample(x0, eps, tt, schedule)
    got_x0, got_eps = x0_and_eps(training_target(x0, eps, tt, schedule), x_t, tt, schedule)
    # fp32: x0 from ε divides by √ᾱ (≥ 0.07), ε from x0 by √(1−ᾱ) (≥ 0.03)
    assert rel_err(got_x0, x0) <= 1e-5 and rel_err(got_eps, eps) <= 1e-5


def test_bad_timesteps_and_shapes_are_rejected():
    schedule, x = NoiseSchedule.sd(), torch.zeros(2, 4, 8, 8)
    with pytest.raises(TypeError, match="integer tensor"):
        q_sample(x, x, torch.tensor([1.0, 2.0]), schedule)
    with pytest.raises(TypeError, match="integer tensor"):
        q_sample(x, x, 5, schedule)
    with pytest.raises(ValueError, match="shape \\[B\\]"):
        q_sample(x, x, torch.tensor([1, 2, 3]), schedule)
    with pytest.raises(ValueError, match="x0 and noise"):
        q_sample(x, x[:, :3], torch.tensor([1, 2]), schedule)
    with pytest.raises(ValueError, match="prediction and x_t"):
        x0_and_eps(x[:1], x, torch.tensor([1, 2]), NoiseSchedule.sd())


def test_process_functions_trace_without_graph_breaks():
    schedule = NoiseSchedule.sd("v_prediction")

    def step(x, pred, t):
        x_t = q_sample(x, pred, t, schedule)
        return ddim_step(x_t, pred, t, t - 100, schedule)

    x, t = randn(2, 4, 8, 8), torch.tensor([999, 50])
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x, x, t), step(x, x, t))


# ---- DDIM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_train_timesteps, steps_offset", [(1000, 1), (1000, 0), (999, 1)])
def test_ddim_timesteps_equal_diffusers_for_every_step_count(spacing, num_train_timesteps, steps_offset):
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=num_train_timesteps, timestep_spacing=spacing, steps_offset=steps_offset
    )
    for n in range(1, num_train_timesteps + 1):
        ref.set_timesteps(n)
        ours = ddim_timesteps(n, num_train_timesteps, spacing, steps_offset)
        assert ours.dtype == torch.int64 and len(ours) == n
        assert torch.equal(ours, ref.timesteps[:n]), (spacing, n)
        assert (ref.timesteps[n:] == -1).all()  # diffusers' float-arange overshoot (trailing only)


def test_trailing_starts_at_last_timestep_and_leading_does_not():
    assert ddim_timesteps(1, spacing="trailing").tolist() == [999]
    assert ddim_timesteps(1, spacing="leading", steps_offset=1).tolist() == [1]
    assert ddim_timesteps(4, spacing="trailing").tolist() == [999, 749, 499, 249]


def test_ddim_timesteps_reject_bad_arguments():
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(10, spacing="uniform")
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(1001)
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(0)


def dummy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Deterministic, input- and timestep-dependent stand-in for a U-Net."""
    return 0.7 * x + torch.sin(x * 3 + t.reshape(-1, 1, 1, 1) / 100.0)


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
@pytest.mark.parametrize(
    "spacing, steps, offset",
    [("trailing", 1, 0), ("trailing", 5, 0), ("trailing", 8, 0), ("leading", 1, 1), ("leading", 6, 1),
     ("leading", 7, 0)],  # where diffusers steps to the next listed timestep (see ddim_sample)
)
def test_ddim_sample_equals_diffusers_ddim_loop(kind, spacing, steps, offset):
    spacing_args = {"timestep_spacing": spacing, "steps_offset": offset}
    ref = diffusers.DDIMScheduler(**SD, **spacing_args, prediction_type=kind, clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(steps)
    x = x_T = randn(2, 4, 8, 8)
    for t in ref.timesteps:
        x = ref.step(dummy_model(x, t.expand(2)), t, x).prev_sample
    schedule = NoiseSchedule.from_config({**SD, "prediction_type": kind})
    ours = ddim_sample(dummy_model, x_T, ddim_timesteps(steps, spacing=spacing, steps_offset=offset), schedule)
    assert rel_err(ours, x) <= 5e-6  # measured <= 8.8e-7 over the 18 cases (float32, up to 8 steps)


@given(kind=prediction_types, steps=st.integers(1, T), t=timesteps, seed=seeds)
def test_ddim_step_equals_diffusers_step(kind, steps, t, seed):
    """One step t -> t − T//n; diffusers' set_alpha_to_one=False ends at ᾱ_0, our t_prev = 0."""
    ref = diffusers.DDIMScheduler(**SD, prediction_type=kind, clip_sample=False, set_alpha_to_one=False)
    ref.set_timesteps(steps)
    t_prev = max(t - T // steps, 0)
    x, pred = randn(2, 4, 6, 6, seed=seed), randn(2, 4, 6, 6, seed=seed + 1)
    expected = ref.step(pred, t, x).prev_sample
    schedule = NoiseSchedule.from_config({**SD, "prediction_type": kind})
    ours = ddim_step(x, pred, full_t(t, 2), full_t(t_prev, 2), schedule)
    assert rel_err(ours, expected) <= 1e-5


@given(kind=prediction_types, steps=st.integers(1, 50), spacing=st.sampled_from(SPACINGS), seed=seeds)
def test_ddim_with_true_prediction_recovers_x0_exactly(kind, steps, spacing, seed):
    schedule = NoiseSchedule.sd(kind)
    x0, eps = randn(2, 4, 8, 8, seed=seed), randn(2, 4, 8, 8, seed=seed + 1)
    ts = ddim_timesteps(steps, spacing=spacing)
    x_start = q_sample(x0, eps, full_t(ts[0].item(), 2), schedule)
    assert rel_err(ddim_sample(oracle(x0, eps, schedule), x_start, ts, schedule), x0) <= 1e-5


@given(kind=prediction_types, seed=seeds)
def test_one_trailing_ddim_step_equals_one_step_prediction_at_last_timestep(kind, seed):
    schedule = NoiseSchedule.sd(kind)
    x = randn(3, 4, 8, 8, seed=seed)
    one_step = predict_x0(dummy_model, x, T - 1, schedule)
    assert torch.equal(ddim_sample(dummy_model, x, ddim_timesteps(1), schedule), one_step)
    assert torch.equal(predict_x0(dummy_model, x, full_t(T - 1, 3), schedule), one_step)


@given(kind=prediction_types, t=st.lists(timesteps, min_size=2, max_size=2), seed=seeds)
def test_predict_x0_with_true_prediction_returns_x0(kind, t, seed):
    schedule = NoiseSchedule.sd(kind)
    x0, eps, t = randn(2, 4, 8, 8, seed=seed), randn(2, 4, 8, 8, seed=seed + 1), torch.tensor(t)
    x_t = q_sample(x0, eps, t, schedule)
    assert rel_err(predict_x0(oracle(x0, eps, schedule), x_t, t, schedule), x0) <= 1e-5


def test_ddim_sample_rejects_unordered_or_out_of_range_timesteps():
    schedule = NoiseSchedule.sd()
    with pytest.raises(ValueError, match="descending"):
        ddim_sample(dummy_model, torch.zeros(1, 4, 8, 8), torch.tensor([10, 500]), schedule)
    with pytest.raises(ValueError, match="lie in"):
        ddim_sample(dummy_model, torch.zeros(1, 4, 8, 8), torch.tensor([1000, 500]), schedule)


# ---- ensembling ----------------------------------------------------------------------------


def stochastic_run(calls: list):
    """A 'sampler' whose output depends on its noise nonlinearly; records the batch of every call."""

    def run(noise):
        calls.append(noise.shape[0])
        return torch.tanh(noise) * 2 + 1

    return run


@given(members=st.integers(1, 6), chunk=st.one_of(st.none(), st.integers(1, 7)), seed=seeds)
def test_ensemble_mean_is_mean_of_runs_for_any_chunk_size(members, chunk, seed):
    noise, calls = randn(members, 3, 4, 5, 5, seed=seed), []
    got = ensemble_mean(stochastic_run(calls), noise, chunk)
    expected = torch.stack([torch.tanh(n) * 2 + 1 for n in noise]).mean(0)
    assert got.shape == (3, 4, 5, 5) and torch.allclose(got, expected, atol=1e-6)
    k = min(chunk or members, members)
    assert calls == [3 * k] * (members // k) + ([3 * (members % k)] if members % k else [])


def test_ensemble_mean_halves_the_chunk_on_out_of_memory():
    calls = []

    def run(noise):
        calls.append(noise.shape[0])
        if noise.shape[0] > 2 * 3:
            raise torch.OutOfMemoryError("fake")
        return noise * 2

    noise = randn(5, 3, 4, 2, 2)
    assert torch.allclose(ensemble_mean(run, noise), noise.mean(0) * 2, atol=1e-6)
    assert calls == [15, 6, 6, 3]  # 5 runs at once fail; then 2 + 2 + 1 runs per call

    def never_fits(noise):
        raise torch.OutOfMemoryError("fake")

    with pytest.raises(torch.OutOfMemoryError):
        ensemble_mean(never_fits, noise)


def test_ensemble_mean_rejects_bad_arguments():
    with pytest.raises(ValueError, match="E, B"):
        ensemble_mean(lambda n: n, torch.zeros(3))
    with pytest.raises(ValueError, match="chunk_size"):
        ensemble_mean(lambda n: n, torch.zeros(2, 1, 3), chunk_size=0)


# ---- multi-resolution annealed noise -------------------------------------------------------


def low_frequency_fraction(noise: torch.Tensor, cutoff: float = 0.125) -> float:
    """Share of spectral power below `cutoff` cycles/pixel (white noise: π·cutoff² ≈ 0.049)."""
    power = torch.fft.fft2(noise.double()).abs().square()
    fy, fx = torch.fft.fftfreq(noise.shape[-2]).abs()[:, None], torch.fft.fftfreq(noise.shape[-1]).abs()[None]
    low = (fy.square() + fx.square()).sqrt() < cutoff
    return ((power * low).sum() / power.sum()).item()


def noise_at(t, b=32, hw=(64, 64), seed=0, **kw):
    like = torch.zeros(b, 4, *hw)
    t = None if t is None else full_t(t, b)
    return multires_noise(like, t, generator=torch.Generator().manual_seed(seed), **kw)


def marigold_pyramid(shape, strength, seed, levels=10):
    """Marigold's "original" multi-resolution noise (src/util/multi_res_noise.py) restated step by
    step from its description: the draws in its order, the sizes from float32 r**i, and the list
    of level sizes it visits. `strength` float or [B] tensor."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    s = strength.reshape(-1, 1, 1, 1) if torch.is_tensor(strength) else strength
    total, sizes = torch.randn(shape, generator=g), []
    for i in range(levels):
        r = torch.rand(1, generator=g) * 2 + 2
        h, w = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        sizes.append((h, w))
        total += up(torch.randn(b, c, h, w, generator=g)) * s**i
        if w == 1 or h == 1:
            break
    return total / total.std(), sizes


@pytest.mark.parametrize("hw", [(64, 64), (40, 24), (96, 64)])
@pytest.mark.parametrize("annealed", [False, True])
def test_multires_noise_reproduces_marigolds_pyramid_from_the_same_draws(hw, annealed):
    t = torch.tensor([0, 250, 999]) if annealed else None
    strength = 0.9 * t / T if annealed else 0.9
    expected, sizes = marigold_pyramid((3, 4, *hw), strength, seed=7)
    got = multires_noise(torch.zeros(3, 4, *hw), t, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    # level 0 is a second full-size draw; each next level divides the previous size by r^i
    assert sizes[0] == hw and 1 in sizes[-1]
    for i, ((h1, w1), (h2, w2)) in enumerate(zip(sizes, sizes[1:]), start=1):
        assert max(1, h1 // 4**i) <= h2 <= max(1, h1 / 2**i) and max(1, w1 // 4**i) <= w2 <= max(1, w1 / 2**i)


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 40), st.integers(1, 40)),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    annealed=st.booleans(),
    seed=seeds,
)
def test_multires_noise_preserves_shape_dtype_device_and_unit_batch_std(shape, dtype, annealed, seed):
    like = torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, shape[:1], generator=g) if annealed else None
    noise = multires_noise(like, t, generator=g)
    assert noise.shape == like.shape and noise.dtype == dtype and noise.device == like.device
    assert torch.isfinite(noise).all()
    if noise.numel() > 1:  # one std over the whole batch (Marigold), not per sample
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
        assert noise.double().std().item() == pytest.approx(1.0, abs=tol)


@given(seed=seeds, annealed=st.booleans())
@settings(max_examples=5)
def test_multires_noise_same_generator_gives_same_noise(seed, annealed):
    t = 600 if annealed else None
    a, b = noise_at(t, b=2, seed=seed), noise_at(t, b=2, seed=seed)
    assert torch.equal(a, b) and not torch.equal(a, noise_at(t, b=2, seed=seed + 1))


@pytest.mark.parametrize("t", [None, 0, 500, 999])
def test_multires_noise_has_zero_mean_and_unit_variance_over_draws(t):
    draws = torch.cat([noise_at(t, b=64, hw=(32, 32), seed=s) for s in range(8)])  # 512 samples
    per_sample_mean = draws.mean(dim=(1, 2, 3))
    # the mean over draws is within 5 standard errors of 0; each element has variance 1
    assert per_sample_mean.mean().abs() <= 5 * per_sample_mean.std() / math.sqrt(len(draws))
    assert draws.var(dim=0).mean().item() == pytest.approx(1.0, abs=0.05)


def test_annealed_noise_at_t0_is_white_gaussian_noise():
    """Weights (s·0/T)^i vanish for i >= 1; level 0 (weight 1) is a second white full-size draw."""
    white = noise_at(0)
    g = torch.Generator().manual_seed(0)
    first = torch.randn(32, 4, 64, 64, generator=g)
    torch.rand(1, generator=g)
    second = torch.randn(32, 4, 64, 64, generator=g)
    assert torch.allclose(white, (first + second) / (first + second).std(), atol=1e-6)
    assert torch.equal(noise_at(None, strength=0.0), white)
    assert low_frequency_fraction(white) == pytest.approx(math.pi * 0.125**2, rel=0.1)
    kurtosis = (white**4).mean().item()
    assert kurtosis == pytest.approx(3.0, abs=0.05)


def test_annealed_noise_carries_more_low_frequency_power_as_t_grows():
    fractions = [low_frequency_fraction(noise_at(t)) for t in (0, 250, 500, 750, 999)]
    assert all(a < b for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[-1] / fractions[0] > 5.0, fractions  # measured ≈ 7.9 (0.37 vs 0.047)
    assert low_frequency_fraction(noise_at(None)) > 5.0 * fractions[0]  # not annealed: weights s^i


def test_annealed_noise_uses_each_samples_own_timestep():
    like = torch.zeros(2, 4, 64, 64)
    noise = multires_noise(like, torch.tensor([0, 999]), generator=torch.Generator().manual_seed(0))
    assert low_frequency_fraction(noise[1:]) > 5.0 * low_frequency_fraction(noise[:1])


def test_multires_noise_rejects_bad_arguments():
    with pytest.raises(ValueError, match="4-D float"):
        multires_noise(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match="4-D float"):
        multires_noise(torch.zeros(1, 4, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="strength"):
        multires_noise(torch.zeros(1, 4, 8, 8), strength=1.5)
    with pytest.raises(ValueError, match="levels"):
        multires_noise(torch.zeros(1, 4, 8, 8), levels=-1)
    with pytest.raises(ValueError, match="shape \\[B\\]"):
        multires_noise(torch.zeros(2, 4, 8, 8), torch.tensor([1, 2, 3]))


@given(t=st.integers(0, 998), dt=st.integers(1, 400), seed=st.integers(0, 2**31 - 1))
def test_ddim_eta_step_without_noise_is_invertible_and_with_noise_keeps_the_marginal_scale(t, dt, seed):
    from unet_seg.diffusion import ddim_eta_step

    schedule = NoiseSchedule.sd()
    a = schedule.alphas_cumprod
    t_next = min(t + dt, 999)
    g = torch.Generator().manual_seed(seed)
    x, eps, z = (torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    up = ddim_eta_step(x, eps, t, t_next, schedule, 0.0, z)
    assert up.dtype == torch.float64
    torch.testing.assert_close(ddim_eta_step(up, eps, t_next, t, schedule, 0.0, z), x)  # same ε: back where it started
    # from x0 = 0 the step is c1·z + c2·ε with c1² + c2² = 1 − ᾱ_t' (the noise scale of q(x_t' | x0)),
    # unless c1² alone exceeds it (small inversion steps), where c2 is floored at 1e-5 as officially
    out = ddim_eta_step((1 - a[t].double()).sqrt() * eps, eps, t, t_next, schedule, 1.0, z)
    c1, c2 = torch.linalg.lstsq(torch.stack([z.flatten(), eps.flatten()], 1), out.flatten()[:, None]).solution.flatten()
    assert c1 > 0 and c2 > 0
    torch.testing.assert_close(c1**2 + c2**2, torch.clamp(1 - a[t_next].double(), min=c1**2 + 1e-10), rtol=1e-6, atol=1e-9)
