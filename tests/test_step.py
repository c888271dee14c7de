"""unet_seg.train.step: the sync-free clipped optimiser step and the CUDA-graphed training step.

The CUDA tests run where a GPU is (the device machine; CI has none and skips them)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from unet_seg.train import CudaGraphCall, CudaGraphStep, check_finite_everywhere, clip_and_step, load_checkpoint, save_checkpoint

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _net(device="cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 3)).to(device)


def _state(net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {**{f"p{i}": p.detach().clone() for i, p in enumerate(net.parameters())},
            **{f"s{i}.{k}": v.clone() for i, s in enumerate(opt.state.values()) for k, v in s.items()}}  # fmt: skip


def _step(net, opt, x, y, max_norm=1.0):
    """A training step with randomness in the model (dropout) and in the loss (noise)."""
    loss = (net(x) + 0.1 * torch.randn_like(y) - y).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip_and_step(opt, net.parameters(), loss, max_norm)
    return loss


@settings(max_examples=20, deadline=None)
@given(max_norm=st.floats(0.01, 10.0), scale=st.floats(0.1, 100.0), weight_decay=st.sampled_from([0.0, 0.01]))
def test_clip_and_step_equals_clipping_then_stepping(max_norm, scale, weight_decay):
    net, x, y = _net().eval(), torch.randn(5, 6), torch.randn(5, 3)  # eval: no dropout, both see the same gradients
    ref = copy.deepcopy(net)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=weight_decay, fused=True) for m in (net, ref)]
    for model, opt in zip((net, ref), opts):
        opt.zero_grad()
        (scale * (model(x) - y).pow(2).mean()).backward()
    norm = clip_and_step(opts[0], net.parameters(), torch.tensor(1.0), max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    opts[1].step()
    assert torch.equal(norm, ref_norm)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_a_non_finite_step_changes_nothing_and_the_loss_check_after_it_raises(bad):
    net, x, y = _net(), torch.randn(5, 6), torch.randn(5, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01, fused=True)
    _step(net, opt, x, y)  # the optimiser state exists
    before = _state(net, opt)
    if bad == "loss":
        loss = _step(net, opt, x, y * float("nan"))
    else:  # a finite loss whose gradient overflows
        loss = (net(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        next(net.parameters()).grad[0, 0] = float("inf")
        clip_and_step(opt, net.parameters(), loss, 1.0)
    after = _state(net, opt)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, moments and step count
    if bad == "loss":
        with pytest.raises(FloatingPointError, match=r"loss is not finite: \[nan\]"):
            check_finite_everywhere(loss, "loss")


def test_clip_and_step_refuses_an_optimiser_that_cannot_skip_on_the_device():
    net = _net()
    with pytest.raises(ValueError, match="fused=True"):
        clip_and_step(torch.optim.AdamW(net.parameters()), net.parameters(), torch.tensor(1.0), 1.0)


def test_a_tensor_learning_rate_keeps_its_tensor_across_a_checkpoint(tmp_path):
    net = _net()
    lr = torch.tensor(1e-2)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, fused=True)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=10)
    _step(net, opt, torch.randn(5, 6), torch.randn(5, 3))
    sched.step()
    path = save_checkpoint(tmp_path, 1, {"net": net}, optimizer=opt, scheduler=sched)
    opt2 = torch.optim.AdamW(_net().parameters(), lr=torch.tensor(5.0), fused=True)
    kept = opt2.param_groups[0]["lr"]
    load_checkpoint(path, {"net": _net()}, optimizer=opt2)
    assert opt2.param_groups[0]["lr"] is kept and torch.equal(kept, lr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
def test_cuda_graph_step_says_it_needs_a_gpu():
    net = _net()
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CudaGraphStep(lambda: None, [net], torch.optim.AdamW(net.parameters(), fused=True))
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CudaGraphCall(lambda x: x)


# ---- on a GPU


def _cuda_pair(lr=1e-2):
    nets = [_net("cuda"), _net("cuda")]
    opts = [
        torch.optim.AdamW(nets[0].parameters(), lr=lr, weight_decay=0.01, fused=True),
        torch.optim.AdamW(nets[1].parameters(), lr=torch.tensor(lr, device="cuda"), weight_decay=0.01, fused=True, capturable=True),
    ]
    return nets, opts


@needs_cuda
def test_graphed_steps_train_as_eager_steps_do_from_the_first_step_on():
    """The warm-up before capture is undone and draws from a forked RNG: the graphed run's weights
    and the CUDA RNG state follow the eager run's, across two alternating input shapes."""
    torch.backends.cuda.matmul.allow_tf32 = False
    (eager, graphed), (opt_e, opt_g) = _cuda_pair()
    step = CudaGraphStep(lambda x, y: _step(graphed, opt_g, x, y), [graphed], opt_g)
    g = torch.Generator("cuda").manual_seed(1)
    for i in range(6):
        n = 5 if i % 2 == 0 else 7
        x, y = torch.randn(n, 6, device="cuda", generator=g), torch.randn(n, 3, device="cuda", generator=g)
        torch.cuda.manual_seed(100 + i)
        loss_e = _step(eager, opt_e, x, y)
        rng_e = torch.cuda.get_rng_state()
        torch.cuda.manual_seed(100 + i)
        loss_g = step(x, y)
        assert torch.equal(torch.cuda.get_rng_state(), rng_e), i
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-6, atol=0)
        for p, q in zip(graphed.parameters(), eager.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert len(step.graphs) == 2


@needs_cuda
def test_graphed_step_reads_the_schedules_lr_and_skips_a_non_finite_step():
    (_, net), (_, opt) = _cuda_pair()
    step = CudaGraphStep(lambda x, y: _step(net, opt, x, y), [net], opt)
    x, y = torch.randn(5, 6, device="cuda"), torch.randn(5, 3, device="cuda")
    step(x, y)
    before = _state(net, opt)
    opt.param_groups[0]["lr"].fill_(0.0)  # as a scheduler does: the captured step must see it
    step(x, y)
    after = _state(net, opt)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("p"))
    assert not torch.equal(before["s0.exp_avg"], after["s0.exp_avg"])  # it stepped, with lr 0
    opt.param_groups[0]["lr"].fill_(1e-2)
    loss = step(x, y * float("nan"))
    assert all(torch.equal(after[k], v) for k, v in _state(net, opt).items())
    with pytest.raises(FloatingPointError, match="not finite"):
        check_finite_everywhere(loss, "loss")


@needs_cuda
def test_graphed_step_refuses_a_float_lr():
    net = _net("cuda")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True, capturable=True)
    with pytest.raises(ValueError, match="lr a CUDA tensor"):
        CudaGraphStep(lambda: None, [net], opt)


def test_backward_and_step_is_zero_grad_backward_clip_and_step():
    from unet_seg.train import backward_and_step, clip_and_step

    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = copy.deepcopy(a)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, fused=True) for m in (a, b)]
    x = torch.randn(5, 4)
    for _ in range(2):  # stale gradients of step 1 must not leak into step 2
        loss = backward_and_step(opts[0], a.parameters(), a(x).square().mean(), max_norm=0.5)
        opts[1].zero_grad(set_to_none=True)
        ref = b(x).square().mean()
        ref.backward()
        clip_and_step(opts[1], b.parameters(), ref, max_norm=0.5)
        assert torch.equal(loss, ref)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@needs_cuda
def test_graphed_calls_draw_what_eager_calls_draw_from_the_same_seed_one_graph_per_shape():
    """CudaGraphCall: a no-grad function with random draws, captured per input shape; seeded before
    each call it returns what the eager function returns, and replays leave shapes' graphs apart."""
    net = _net("cuda").eval()
    fn = torch.no_grad()(lambda x: net(x + torch.randn_like(x)))
    call = CudaGraphCall(fn)
    for shape in [(3, 6), (5, 6), (3, 6)]:
        x = torch.rand(shape, device="cuda")
        torch.cuda.manual_seed(7)
        eager = fn(x)
        torch.cuda.manual_seed(7)
        torch.testing.assert_close(call(x), eager)
    assert len(call.graphs) == 2
    call.close()
