import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_seg.losses import (
    check_finite,
    consistency_kl,
    consistency_l2,
    cross_entropy,
    dice_loss,
    diffusion_consistency_loss,
    latent_mse,
)

seeds = st.integers(0, 2**31 - 1)
ROUNDING = 1e-6  # float32 sums of non-negative terms may land a few ulps below 0


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def dcl_inputs(seed, b=2, r=3, d=4, h=3, w=5):
    return randn(b, r, d, seed=seed), randn(b, d, h, w, seed=seed + 1), randn(b, d, h, w, seed=seed + 2)


# ---------------------------------------------------------------------------------------------
# Non-negativity and zero at equality


@given(seeds, st.floats(0.1, 10.0))
def test_every_loss_is_non_negative(seed, scale):
    a, b = randn(2, 5, 3, 4, seed=seed, scale=scale), randn(2, 5, 3, 4, seed=seed + 1, scale=scale)
    target = torch.randint(5, (2, 3, 4), generator=torch.Generator().manual_seed(seed))
    assert consistency_l2(a, b) >= 0
    assert consistency_kl(a, b) >= -ROUNDING
    assert cross_entropy(a, target) >= 0
    assert 0 <= dice_loss(a, (b > 0).float()) <= 1
    assert latent_mse(a, b) >= 0
    l_dist, l_sup = diffusion_consistency_loss(*dcl_inputs(seed))
    assert l_dist >= -ROUNDING and l_sup >= 0


@given(seeds, st.floats(0.1, 10.0))
def test_consistency_and_latent_losses_are_zero_on_equal_inputs(seed, scale):
    x = randn(2, 5, 3, 4, seed=seed, scale=scale)
    assert consistency_l2(x, x.clone()) == 0
    assert latent_mse(x, x.clone()) == 0
    assert consistency_kl(x, x.clone()).abs() <= ROUNDING


@given(seeds, st.integers(1, 4), st.integers(1, 5))
def test_dcl_is_zero_when_strong_features_are_what_one_agent_rebuilds(seed, b, d):
    # One agent: softmax over agents is 1, so F̂ is q at every pixel, spatially flat; strong
    # features flat and equal to q give a flat target (L_dist = 0) and q̂ = q (L_sup = 0).
    q = randn(b, 1, d, seed=seed)
    weak = randn(b, d, 2, 3, seed=seed + 1)
    strong = q.transpose(1, 2).unsqueeze(-1).expand(b, d, 2, 3)
    l_dist, l_sup = diffusion_consistency_loss(q, weak, strong)
    assert l_dist.abs() <= ROUNDING and l_sup <= 1e-12


@given(st.integers(0, 4))
def test_ce_and_dice_vanish_when_logits_saturate_to_the_target(seed):
    target = torch.randint(3, (2, 4, 4), generator=torch.Generator().manual_seed(seed))
    one_hot = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert cross_entropy(40 * (2 * one_hot - 1), target) < 1e-12
    assert dice_loss(40 * (2 * one_hot - 1), one_hot) < 1e-6


# ---------------------------------------------------------------------------------------------
# Hand-computed values


def test_kl_is_teacher_to_student_with_softmax_over_classes():
    teacher = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)  # p_t = (1/4, 3/4)
    student = torch.zeros(1, 2, 1, 1)  # p_s = (1/2, 1/2)
    forward = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    backward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert consistency_kl(student, teacher).item() == pytest.approx(forward, rel=1e-6)
    assert abs(forward - backward) > 0.01  # the direction is observable
    # Two pixels, the second already consistent: the mean over pixels halves it.
    two = consistency_kl(torch.cat([student, teacher], 3), torch.cat([teacher, teacher], 3))
    assert two.item() == pytest.approx(forward / 2, rel=1e-6)


def test_l2_is_mean_squared_difference():
    assert consistency_l2(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])).item() == pytest.approx(2.5)


def test_cross_entropy_averages_over_non_ignored_pixels_only():
    logits = torch.zeros(1, 4, 2, 2)
    logits[0, 0, 0, 0] = math.log(3.0)  # p(class 0) = 3 / 6 at pixel (0, 0)
    logits[0, 1, :, 1] = 100.0  # ignored pixels, confidently wrong: must not count
    target = torch.tensor([[[0, 255], [3, 255]]])
    expected = (math.log(2.0) + math.log(4.0)) / 2
    assert cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_of_an_all_ignored_batch_is_zero_not_nan():
    logits = randn(1, 3, 2, 2).requires_grad_()
    loss = cross_entropy(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_dice_normalises_each_mask_then_averages():
    logits = torch.zeros(2, 2)  # σ = 1/2 everywhere
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # mask 0: 1 − (2·0.5 + 1) / (1 + 1 + 1) = 1/3;  mask 1: 1 − (0 + 1) / (1 + 0 + 1) = 1/2
    assert dice_loss(logits, targets).item() == pytest.approx((1 / 3 + 1 / 2) / 2, rel=1e-6)


def test_dcl_by_hand_with_one_agent_one_channel_two_pixels():
    q = torch.tensor([[[0.5]]])  # [B=1, r=1, d=1]
    weak = torch.zeros(1, 1, 1, 2)  # S = 0: the agent attends both pixels equally
    strong = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    p1 = 1 / (1 + math.e**2)
    p2 = 1 - p1
    kl = p1 * math.log(p1 / 0.5) + p2 * math.log(p2 / 0.5)  # target softmax(1, 3) vs flat F̂
    sup = (0.5 - (1.0 + 3.0) / 2) ** 2  # q̂ = mean of the strong features
    l_dist, l_sup = diffusion_consistency_loss(q, weak, strong)
    assert l_dist.item() == pytest.approx(kl, rel=1e-6)
    assert l_sup.item() == pytest.approx(sup, rel=1e-6)


def dcl_brute_force(q, weak, strong):
    """The DCL equations of `diffusion_consistency_loss`'s docstring as scalar loops in float64:
    every similarity, softmax, rebuilt feature and KL term summed one entry at a time."""
    q, weak, strong = (x.double().tolist() for x in (q, weak.flatten(2), strong.flatten(2)))
    b_, r_, d_, n_ = len(q), len(q[0]), len(q[0][0]), len(weak[0][0])

    def softmax(xs):
        m = max(xs)
        e = [math.exp(x - m) for x in xs]
        return [x / sum(e) for x in e]

    dist = sup = 0.0
    for b in range(b_):
        sim = [[sum(q[b][j][c] * weak[b][c][n] for c in range(d_)) / math.sqrt(d_) for n in range(n_)] for j in range(r_)]
        over_agents = [softmax([sim[j][n] for j in range(r_)]) for n in range(n_)]  # [N][r]
        recon = [[sum(q[b][j][c] * over_agents[n][j] for j in range(r_)) for n in range(n_)] for c in range(d_)]
        for c in range(d_):
            p, p_hat = softmax(strong[b][c]), softmax(recon[c])
            dist += sum(p[n] * (math.log(p[n]) - math.log(p_hat[n])) for n in range(n_)) / (b_ * d_)
        for j in range(r_):
            over_pixels = softmax(sim[j])
            for c in range(d_):
                q_hat = sum(over_pixels[n] * strong[b][c][n] for n in range(n_))
                sup += (q[b][j][c] - q_hat) ** 2 / (b_ * r_ * d_)
    return dist, sup


@settings(max_examples=10)
@given(seeds, st.integers(1, 2), st.integers(2, 4), st.integers(2, 5), st.integers(1, 3), st.integers(2, 4))
def test_dcl_equals_a_brute_force_loop_with_several_agents_and_channels(seed, b, r, d, h, w):
    """r > 1, d > 1 and non-zero weak features: catches a missing 1/√d, softmax over the wrong
    axis (pixels for F̂, agents for q̂), KL in the other direction, and sums for means."""
    q, weak, strong = randn(b, r, d, seed=seed), randn(b, d, h, w, seed=seed + 1, scale=2.0), randn(b, d, h, w, seed=seed + 2)
    l_dist, l_sup = diffusion_consistency_loss(q, weak, strong)
    dist, sup = dcl_brute_force(q, weak, strong)
    # float32 against float64 loops: measured relative error <= 3.5e-7 (200 draws)
    assert l_dist.item() == pytest.approx(dist, rel=1e-5, abs=1e-7)
    assert l_sup.item() == pytest.approx(sup, rel=1e-5)


@given(seeds)
def test_dcl_distribution_loss_ignores_per_channel_offsets_of_strong_features(seed):
    q, weak, strong = dcl_inputs(seed)
    shift = randn(2, 4, 1, 1, seed=seed + 3, scale=5.0)
    a, _ = diffusion_consistency_loss(q, weak, strong)
    b, _ = diffusion_consistency_loss(q, weak, strong + shift)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Gradients


@given(seeds)
def test_gradients_are_finite_and_reach_the_student_only_when_teacher_is_detached(seed):
    for loss_fn in (consistency_l2, consistency_kl):
        student = randn(2, 3, 4, 4, seed=seed).requires_grad_()
        teacher = randn(2, 3, 4, 4, seed=seed + 1).requires_grad_()
        loss_fn(student, teacher).backward()
        assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
        assert teacher.grad is None
        loss_fn(student, teacher, detach_teacher=False).backward()
        assert torch.isfinite(teacher.grad).all() and teacher.grad.abs().sum() > 0


@given(seeds)
def test_dcl_gradients_are_finite_and_never_reach_strong_features(seed):
    q, weak, strong = (x.requires_grad_() for x in dcl_inputs(seed))
    l_dist, l_sup = diffusion_consistency_loss(q, weak, strong)
    (l_dist + l_sup).backward()
    for x in (q, weak):
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert strong.grad is None


@given(seeds)
def test_segmentation_loss_gradients_are_finite(seed):
    logits = randn(2, 4, 3, 3, seed=seed, scale=30.0).requires_grad_()
    target = torch.randint(4, (2, 3, 3), generator=torch.Generator().manual_seed(seed))
    (cross_entropy(logits, target) + dice_loss(logits, (logits.detach() < 0).float())).backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------
# dtype, compile, bad input


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_losses_keep_the_input_dtype(dtype):
    a, b = randn(1, 3, 2, 2, seed=0, dtype=dtype), randn(1, 3, 2, 2, seed=1, dtype=dtype)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    for loss in (
        consistency_l2(a, b),
        consistency_kl(a, b),
        cross_entropy(a, target),
        dice_loss(a, b > 0),
        latent_mse(a, b),
        *diffusion_consistency_loss(a[:, :, :, 0].transpose(1, 2), b, a),
    ):
        assert loss.dtype == dtype and loss.ndim == 0


def test_losses_compile_without_graph_breaks():
    def total(q, weak, strong, logits, teacher, target):
        l_dist, l_sup = diffusion_consistency_loss(q, weak, strong)
        return (
            l_dist
            + l_sup
            + consistency_l2(logits, teacher)
            + consistency_kl(logits, teacher)
            + cross_entropy(logits, target)
            + dice_loss(logits, teacher > 0)
            + latent_mse(logits, teacher)
        )

    args = (*dcl_inputs(0), randn(2, 4, 3, 5, seed=5), randn(2, 4, 3, 5, seed=6))
    args += (torch.randint(4, (2, 3, 5), generator=torch.Generator().manual_seed(7)),)
    compiled = torch.compile(total, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), total(*args))


def test_check_finite_names_the_loss_and_passes_finite_values_through():
    loss = torch.tensor(1.5)
    assert check_finite(loss, "dice") is loss
    with pytest.raises(FloatingPointError, match=r"loss_ce is not finite: \[nan\]"):
        check_finite(torch.tensor(float("nan")), "loss_ce")
    with pytest.raises(FloatingPointError, match="l_dist is not finite"):
        check_finite(torch.tensor([1.0, float("inf")]), "l_dist")


def test_bad_shapes_and_dtypes_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        consistency_l2(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="disagree"):
        cross_entropy(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        cross_entropy(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"weak features must be \[2, 4, h, w\]"):
        diffusion_consistency_loss(torch.zeros(2, 3, 4), torch.zeros(2, 5, 3, 3), torch.zeros(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"queries must be \[B, r, d\]"):
        diffusion_consistency_loss(torch.zeros(2, 4), torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3))


def test_official_kl_variant_is_pytorch_kl_div_batchmean_times_t_squared_clamped():
    s, t = randn(2, 5, 3, 4, seed=1), randn(2, 5, 3, 4, seed=2)
    for temperature in (1.0, 2.0):
        expected = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean")
        got = consistency_kl(s, t, temperature=temperature, reduction="batchmean")
        torch.testing.assert_close(got, expected * temperature**2)
    plain = consistency_kl(s, t)
    torch.testing.assert_close(consistency_kl(s, t, reduction="batchmean"), plain * 12)  # 3·4 positions per image
    student = s.clone().requires_grad_()
    capped = consistency_kl(student, t, reduction="batchmean", max_value=0.5 * plain.item())
    assert capped.item() == pytest.approx(0.5 * plain.item())
    capped.backward()
    assert student.grad.abs().sum() == 0  # the official clamp passes no gradient above the cap


def test_kl_weight_is_applied_before_the_clamp_as_the_official_kl_loss():
    # per position, two classes: teacher p = (1, 0) (to float precision), student q = (0.5, 0.5):
    # KL = log 2 per image, written out; 0.1 · 8 log 2 = 0.555 is cut at 0.5, 0.1 · 4 log 2 = 0.277 is not
    teacher = torch.tensor([[[[40.0]], [[0.0]]]])
    kl = math.log(2)
    for positions, expected in ((4, 0.1 * 4 * kl), (8, 0.5)):
        student = torch.zeros(1, 2, positions, 1)
        got = consistency_kl(student, teacher.expand(-1, -1, positions, -1), reduction="batchmean", weight=0.1, max_value=0.5)
        assert got.item() == pytest.approx(expected, rel=1e-6)  # clamp before the weight gives 0.05 for both


def test_cross_entropy_counting_ignored_pixels_divides_by_all_pixels():
    logits, target = randn(1, 3, 2, 4, seed=0), torch.tensor([[[0, 1, 2, 255], [255, 255, 1, 0]]])
    valid = cross_entropy(logits, target)
    assert cross_entropy(logits, target, count_ignored=True).item() == pytest.approx(valid.item() * 5 / 8)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, n=st.integers(1, 3))
def test_dice_ignore_index_equals_dice_over_the_kept_pixels_only(seed, n):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 6, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 2, (n, 6, 5), generator=g)
    target[:, :2] = 255
    got = dice_loss(logits, target, ignore_index=255)
    expected = []
    for i in range(n):  # the loss of each mask over its kept pixels, written out
        keep = target[i] != 255
        p, t = logits[i][keep].sigmoid(), target[i][keep].double()
        expected.append(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    assert math.isclose(got.item(), torch.stack(expected).mean().item(), rel_tol=1e-12)
    # without ignore_index nothing changes for targets in {0, 1}
    clean = target.clamp(max=1)
    assert dice_loss(logits, clean, ignore_index=255) == dice_loss(logits, clean)
