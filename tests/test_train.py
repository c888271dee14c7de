import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

import unet_seg.train as train
from unet_seg.hub import CheckpointError
from unet_seg.train import (
    ResumableSampler,
    atomic_path,
    autocast,
    check_finite_everywhere,
    checkpoint_path,
    init_distributed,
    is_main,
    latest_checkpoint,
    load_checkpoint,
    maybe_compile,
    progress,
    resumable_loader,
    training_batches,
    save_checkpoint,
    seed_everything,
    unwrap,
    write_metrics,
)

from .helpers import randn

# ---------------------------------------------------------------- helpers


def assert_same_tree(a, b, where="root"):
    """Equal structure, types and values; tensors equal bit for bit with the same dtype."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))


DATA = TensorDataset(torch.linspace(-1, 1, 24 * 4).reshape(24, 4), torch.linspace(0, 1, 24).reshape(24, 1))
BATCH = 4  # 6 steps per epoch


def run_training(out, stop, resume=False, restore_rng=True, make_model=tiny_net):
    """Train to global step `stop` (optionally resuming from `out`), save, and return the losses
    of the steps run here plus the final model and optimizer state. Randomness from all four
    RNGs enters every step (dropout, torch noise, numpy, python random) and the data order
    comes from the seeded sampler."""
    seed_everything(0)
    model = make_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    loader = resumable_loader(DATA, BATCH, seed=0)
    step = 0
    if resume:
        step = load_checkpoint(latest_checkpoint(out), {"net": model}, optimizer=opt, scheduler=sched, restore_rng=restore_rng).step
    losses = []
    for step, epoch, (x, y) in training_batches(loader, step, stop):
        scale = 1 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        noisy = x + 0.05 * torch.randn_like(x)
        loss = check_finite_everywhere(F.mse_loss(model(noisy) * scale, y), "loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    save_checkpoint(out, step, {"net": model}, optimizer=opt, scheduler=sched, epoch=epoch)
    return torch.stack(losses), model.state_dict(), opt.state_dict(), sched.state_dict()


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("k", [3, 8])  # inside the first epoch; inside the second
def test_resume_after_k_steps_equals_straight_run_bit_for_bit(tmp_path, k):
    n = 14  # crosses two epoch boundaries
    straight = run_training(tmp_path / "straight", n)
    first = run_training(tmp_path / "split", k)
    second = run_training(tmp_path / "split", n, resume=True)
    assert torch.equal(torch.cat([first[0], second[0]]), straight[0])
    assert_same_tree(second[1], straight[1])
    assert_same_tree(second[2], straight[2])
    assert_same_tree(second[3], straight[3])


def test_resume_without_restoring_rng_diverges(tmp_path):
    # The control for the test above: the RNG states are what make it pass.
    straight = run_training(tmp_path / "straight", 10)
    run_training(tmp_path / "split", 4)
    second = run_training(tmp_path / "split", 10, resume=True, restore_rng=False)
    assert not torch.equal(second[0], straight[0][4:])


# ---------------------------------------------------------------- frozen weights: a fingerprint, not stored


def frozen_base_net(base_seed=0, dtype=torch.float32, width=4):
    """A frozen "pre-trained" Linear (its own seed: another base checkpoint) before a trainable
    part with a BatchNorm, whose running statistics are buffers that training changes."""
    base = nn.Linear(4, width).to(dtype).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(randn(width, 4, seed=100 + base_seed))
        base.bias.copy_(randn(width, seed=200 + base_seed))
    return nn.Sequential(base, nn.Linear(width, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))


class Float32(nn.Module):
    """The frozen base of `frozen_base_net` cast back to float32 on the way, whatever its dtype."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net[1:](self.net[0](x.to(self.net[0].weight.dtype)).float())


def test_a_checkpoint_holds_no_tensor_of_a_frozen_part_but_a_frozen_model_passed_alone_whole(tmp_path):
    model, pretrained_here = frozen_base_net(), nn.Linear(3, 3).requires_grad_(False)  # the latter: e.g. a demo's pre-trained U-Net
    assert set(train.frozen_weights(model)) == {"0.weight", "0.bias"} and train.frozen_weights(pretrained_here) == {}
    path = save_checkpoint(tmp_path, 1, {"net": model, "pre": pretrained_here})
    stored = load_file(str(path))
    assert not any(k.startswith("model/net/0.") for k in stored)
    assert {k for k in stored if k.startswith("model/net/")} == {f"model/net/{k}" for k in model.state_dict() if not k.startswith("0.")}
    assert {"model/net/2.running_mean", "model/net/2.running_var", "model/pre/weight", "model/pre/bias"} <= set(stored)
    whole = save_checkpoint(tmp_path / "whole", 1, {"net": model.requires_grad_(True)})  # nothing frozen: all stored
    assert set(load_file(str(whole))) == {f"model/net/{k}" for k in model.state_dict()}


def test_resume_with_a_frozen_part_equals_a_straight_run_bit_for_bit(tmp_path):
    straight = run_training(tmp_path / "straight", 10, make_model=frozen_base_net)
    first = run_training(tmp_path / "split", 4, make_model=frozen_base_net)
    second = run_training(tmp_path / "split", 10, resume=True, make_model=frozen_base_net)
    assert torch.equal(torch.cat([first[0], second[0]]), straight[0])
    assert_same_tree(second[1], straight[1])
    assert_same_tree(second[2], straight[2])


@pytest.mark.parametrize(
    "other, differs",
    [
        (lambda: frozen_base_net(base_seed=1), r"the same 2 names, dtypes and shapes with other values: another checkpoint of the same model"),
        (lambda: frozen_base_net(dtype=torch.bfloat16), r"other dtypes: net\.0\.weight \(float32 there, bfloat16 here\), net\.0\.bias \(float32 there, bfloat16 here\)"),
    ],
)
def test_resume_on_other_frozen_weights_is_refused_in_one_line_naming_the_difference(tmp_path, capsys, other, differs):
    run_training(tmp_path, 3, make_model=lambda: Float32(frozen_base_net()))
    model = Float32(other())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(train.FrozenWeightsDiffer, match=differs) as e:
        train.resume_latest(tmp_path, {"net": model})  # refused at once: not passed over for an older checkpoint
    assert "\n" not in str(e.value) and "model 'net' was trained on other frozen weights" in str(e.value)
    assert_same_tree(dict(model.state_dict()), before)  # nothing half-loaded
    assert "passing over" not in capsys.readouterr().err


def test_a_frozen_tensor_of_another_shape_is_named(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"net": frozen_base_net()})
    other = frozen_base_net()
    other[0].weight = nn.Parameter(torch.zeros(4, 5), requires_grad=False)
    with pytest.raises(train.FrozenWeightsDiffer, match=r"other shapes: 0\.weight \(\[4, 4\] there, \[4, 5\] here\)"):
        load_checkpoint(path, {"net": other})


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]),
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    where=st.integers(0, 2**31), bit=st.integers(0, 7), seed=st.integers(0, 2**16),
)
def test_weights_fingerprint_changes_with_any_byte_dtype_or_name_and_ignores_layout(dtype, shape, where, bit, seed):
    from unet_seg.hub import weights_fingerprint

    t = (randn(*shape, 2, seed=seed) * 100).to(dtype)
    other = {"a.weight": randn(3, seed=seed + 1)}
    fp = weights_fingerprint({"b.weight": t, **other})
    assert fp == weights_fingerprint({**other, "b.weight": t.clone()})  # insertion order: none
    wide = torch.zeros(*shape, 4, dtype=dtype)
    wide[..., 1:3] = t
    assert not wide[..., 1:3].is_contiguous() or math.prod(shape) == 1
    assert fp == weights_fingerprint({"b.weight": wide[..., 1:3], **other})  # the same values in another memory layout
    raw = t.reshape(-1).view(torch.uint8).clone()
    raw[where % raw.numel()] ^= 1 << bit  # one bit of one byte
    assert weights_fingerprint({"b.weight": raw.view(dtype).reshape(t.shape), **other}) != fp
    cast = torch.float64 if dtype != torch.float64 else torch.float32
    assert weights_fingerprint({"b.weight": t.to(cast), **other}) != fp  # the same values in another dtype
    assert weights_fingerprint({"b.bias": t, **other}) != fp
    assert weights_fingerprint({"b.weight": t, **other}, label="UNet") != fp
    if torch.cuda.is_available():
        assert weights_fingerprint({"b.weight": t.cuda(), **other}) == fp


def test_sampler_start_skips_exactly_the_consumed_samples():
    sampler = ResumableSampler(range(20), seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=7)
    assert list(sampler) == full[7:] and len(sampler) == 13
    sampler.set_epoch(3)
    assert sorted(sampler) == list(range(20)) and list(sampler) != full
    with pytest.raises(ValueError, match="start must lie in"):
        sampler.set_epoch(0, start=21)


class EpochAware(torch.utils.data.Dataset):
    def __init__(self):
        self.epoch = -1

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return torch.tensor([i, self.epoch])


def test_training_batches_resume_mid_epoch_with_the_same_batches_and_epochs():
    def run(start, stop):
        loader = resumable_loader(EpochAware(), BATCH, seed=3)
        return [(s, e, b.tolist()) for s, e, b in training_batches(loader, start, stop)]

    full = run(0, 13)  # 20 samples, batch 4: 5 steps per epoch, epochs 0, 1, 2
    assert [s for s, _, _ in full] == list(range(1, 14)) and [e for _, e, _ in full] == [0] * 5 + [1] * 5 + [2] * 3
    assert all(b[0][1] == e for _, e, b in full)  # the dataset's set_epoch was called
    assert run(7, 13) == full[7:] and run(13, 13) == []
    with pytest.raises(ValueError, match="more than"):
        next(training_batches(resumable_loader(EpochAware(), 32, seed=0), 0, 1))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_checkpoints_it_and_stops(signum, tmp_path):
    """Ctrl-C or SIGTERM mid-step: the step completes, `should_checkpoint` is true for it (not
    for the others), the loop stops after it with TrainingInterrupted naming the checkpoint, and
    the previous signal handlers come back."""
    from unet_seg.errors import TrainingInterrupted

    before = signal.getsignal(signum)
    model, saves, steps = nn.Linear(1, 1), [], []
    with pytest.raises(TrainingInterrupted) as e:
        for step, _, _ in training_batches(resumable_loader(EpochAware(), BATCH, seed=3), 0, 13):
            if step == 3:
                os.kill(os.getpid(), signum)  # arrives mid-step
            steps.append(step)
            if train.should_checkpoint(step, 100, 13):
                saves.append(step)
                train.save_checkpoint(tmp_path, step, {"m": model})
    assert steps == [1, 2, 3] and saves == [3] and e.value.step == 3
    assert str(e.value) == (
        f"{signal.Signals(signum).name}: interrupted at step 3; wrote {checkpoint_path(tmp_path, 3)}; rerun with --resume to continue"
    )
    assert signal.getsignal(signum) is before
    assert [s for s, _, _ in training_batches(resumable_loader(EpochAware(), BATCH, seed=3), 0, 4)] == [1, 2, 3, 4]


def test_resume_says_when_there_is_nothing_and_passes_over_a_corrupt_latest_checkpoint(tmp_path, capsys):
    model = nn.Linear(2, 2)
    assert train.resume_latest(tmp_path, {"m": model}) == 0
    assert capsys.readouterr().out == f"--resume: no checkpoint in {tmp_path}; starting from step 0\n"
    weights = {}
    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(step)
        weights[step] = model.weight.clone()
        train.save_checkpoint(tmp_path, step, {"m": model})
    latest = checkpoint_path(tmp_path, 2)
    latest.write_bytes(latest.read_bytes()[:100])  # a truncated write
    with pytest.warns(UserWarning, match=f"passing over {latest}, which cannot be used: .*corrupt or truncated"):
        assert train.resume_latest(tmp_path, {"m": model}) == 1
    assert torch.equal(model.weight, weights[1])
    assert f"resumed {checkpoint_path(tmp_path, 1)} (step 1); passed over 1 newer" in capsys.readouterr().out
    checkpoint_path(tmp_path, 1).write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning), pytest.raises(
        CheckpointError, match="none of the 2 checkpoint.* can be used .*delete step_000000002.safetensors, step_000000001.safetensors"
    ):
        train.resume_latest(tmp_path, {"m": model})


def test_resume_with_another_steps_than_the_run_says_so_in_one_line(tmp_path, capsys):
    model = nn.Linear(2, 2)
    args = {"steps": 10, "ddim_steps": 50, "out": tmp_path}  # how the recipes store their arguments
    train.save_checkpoint(tmp_path / "recipe", 4, {"m": model}, extra={"args": str(args)})
    train.save_checkpoint(tmp_path / "library", 4, {"m": model}, extra={"steps": 10})
    for run in ("recipe", "library"):
        capsys.readouterr()
        assert train.resume_latest(tmp_path / run, {"m": model}, steps=10) == 4
        assert capsys.readouterr().out == f"resumed {checkpoint_path(tmp_path / run, 4)} (step 4)\n"
        assert train.resume_latest(tmp_path / run, {"m": model}, steps=20) == 4
        assert capsys.readouterr().out.splitlines()[1:] == ["--resume: resuming at step 4 of the run's 10; training to 20 as asked (--steps)"]
        assert train.resume_latest(tmp_path / run, {"m": model}, steps=3) == 4
        assert capsys.readouterr().out.splitlines()[1:] == ["--resume: resuming at step 4 of the run's 10; --steps 3 is already reached: nothing to train"]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=10)
    train.save_checkpoint(tmp_path / "poly", 4, {"m": model}, optimizer=opt, scheduler=sched, extra={"steps": 10})
    capsys.readouterr()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=20)  # built for the new --steps, then restored
    train.resume_latest(tmp_path / "poly", {"m": model}, optimizer=opt, scheduler=sched, steps=20)
    assert capsys.readouterr().out.splitlines()[1:] == [
        "--resume: resuming at step 4 of the run's 10; training to 20 as asked (--steps); the learning-rate schedule still ends at step 10"
    ]
    train.save_checkpoint(tmp_path / "unknown", 4, {"m": model})  # no record of the run's steps: nothing to compare
    capsys.readouterr()
    train.resume_latest(tmp_path / "unknown", {"m": model}, steps=20)
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_a_final_checkpoint_holds_the_weights_alone_and_resuming_it_further_says_so(tmp_path, capsys):
    model, opt = stepped(OPTIMIZERS["adamw"], 3)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=10)
    full = save_checkpoint(tmp_path / "full", 10, {"m": model}, optimizer=opt, scheduler=sched, extra={"steps": 10})
    final = save_checkpoint(tmp_path / "final", 10, {"m": model}, optimizer=opt, scheduler=sched, extra={"steps": 10}, final=True)
    tensor_bytes = lambda path: sum(t.numel() * t.element_size() for t in load_file(str(path)).values())  # noqa: E731
    assert set(load_file(str(final))) == {k for k in load_file(str(full)) if k.startswith("model/")}
    assert 3 * tensor_bytes(final) <= tensor_bytes(full)  # AdamW: two moments per weight (amsgrad: three)
    fresh_model, fresh_opt = stepped(OPTIMIZERS["adamw"], 0)
    untouched = fresh_opt.state_dict()
    resumed = load_checkpoint(final, {"m": fresh_model}, optimizer=fresh_opt)
    assert resumed.final and not load_checkpoint(full, {"m": tiny_net()}).final and resumed.step == 10
    assert_same_tree(fresh_model.state_dict(), model.state_dict())
    assert_same_tree(fresh_opt.state_dict(), untouched)  # left as it was
    capsys.readouterr()
    assert train.resume_latest(tmp_path / "final", {"m": fresh_model}, optimizer=fresh_opt, steps=10) == 10  # re-evaluate: no line
    assert capsys.readouterr().out.splitlines()[1:] == []
    train.resume_latest(tmp_path / "final", {"m": fresh_model}, optimizer=fresh_opt, steps=20)
    assert capsys.readouterr().out.splitlines()[1] == (
        "--resume: step_000000010.safetensors ended a finished demo and holds its weights alone: training goes on from them "
        "with a fresh optimizer and learning-rate schedule, not as one uninterrupted run would"
    )
    with pytest.raises(CheckpointError, match="holds no optimizer state"):  # a checkpoint saved without one, not final
        load_checkpoint(save_checkpoint(tmp_path / "bare", 1, {"m": model}), {"m": model}, optimizer=opt)


def test_a_final_checkpoint_deletes_the_runs_earlier_ones_only_once_it_is_written(tmp_path, monkeypatch):
    import importlib

    model, opt = stepped(OPTIMIZERS["adamw"], 1)
    names = lambda: sorted(p.name for p in tmp_path.iterdir())  # noqa: E731
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"m": model}, optimizer=opt)  # no keep_last: all kept
    written = names()
    assert written == [checkpoint_path(tmp_path, s).name for s in (1, 2, 3)]

    def disk_full(*a, **kw):
        raise OSError(28, "No space left on device")

    checkpoints = importlib.import_module("unet_seg.train.checkpoints")
    with monkeypatch.context() as m:
        m.setattr(checkpoints, "save_file", disk_full)
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint(tmp_path, 4, {"m": model}, optimizer=opt, final=True)
    assert names() == written  # the final one failed: the resumable ones stay
    save_checkpoint(tmp_path, 4, {"m": model}, optimizer=opt, final=True)
    assert names() == [checkpoint_path(tmp_path, 4).name]
    save_checkpoint(tmp_path, 5, {"m": model}, optimizer=opt, keep_last=2)  # a finished demo resumed to more steps
    save_checkpoint(tmp_path, 6, {"m": model}, optimizer=opt, final=True)
    assert names() == [checkpoint_path(tmp_path, 6).name]


class SignalDispositions(torch.utils.data.Dataset):
    """Items: (SIGINT ignored, SIGTERM ignored, the user's worker_init_fn ran) in this process."""

    initialised = False

    def __len__(self):
        return 4

    def __getitem__(self, i):
        ignored = [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM)]
        return torch.tensor([*ignored, SignalDispositions.initialised])


def mark_initialised(worker_id):
    SignalDispositions.initialised = True


def test_loader_workers_ignore_ctrl_c_so_the_main_process_can_checkpoint():
    """Ctrl-C reaches the whole process group: a worker that died of it would fail the next batch
    before the interrupted step's checkpoint. The workers leave signals to the main process (and
    still run the caller's worker_init_fn)."""
    before = SignalDispositions()[0]  # a process started in the background inherits SIGINT ignored
    loader = resumable_loader(SignalDispositions(), 2, seed=0, num_workers=1, worker_init_fn=mark_initialised)
    assert all(bool(b.all()) for b in loader)
    assert torch.equal(SignalDispositions()[0], before)  # the main process keeps its handlers


def test_progress_prints_plain_lines_when_stderr_is_not_a_terminal(capsys):
    """In a log file or pipe tqdm disables itself: a 4-minute demo printed nothing."""
    bar = train.progress(total=40, desc="Demo")
    for step in range(40):
        bar.update()
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 20 and lines[0].startswith("Demo: step 2/40 | loss=0.500 | ") and "ETA" in lines[0]
    assert lines[-1].startswith("Demo: step 40/40 | loss=0.025 | ") and lines[-1].endswith("steps/s | ETA 0:00")
    assert list(train.progress(range(6), every=3)) == list(range(6))
    assert capsys.readouterr().err.count("step ") == 2


def test_progress_counts_in_its_unit_and_stays_silent_for_a_phase_shorter_than_its_delay(capsys, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    bar = train.progress(total=8, desc="evaluating", unit="image", delay=5.0, every=2)
    bar.update(4)  # 0 s in: nothing yet
    assert capsys.readouterr().err == ""
    clock[0] += 6.0
    bar.update(4)
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["evaluating: image 8/8 | 1.33 images/s | ETA 0:00"]
    quick = train.progress(total=8, unit="image", delay=5.0)
    quick.update(8)
    quick.close()
    assert capsys.readouterr().err == ""


def test_evaluation_shows_progress_once_it_lasts_longer_than_a_few_seconds(capsys, monkeypatch):
    from unet_seg import segmentation

    clock = [0.0]

    def predict(x):  # each image "takes" 2 s
        clock[0] += 2.0
        return torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long)

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    data = [{"image": torch.zeros(3, 4, 4), "label": torch.zeros(4, 4, dtype=torch.long)}] * 20
    segmentation.evaluate_semantic(predict, data, 2, torch.device("cpu"), desc="evaluating hazy")
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("evaluating hazy: image ") for line in lines) and lines[-1].startswith("evaluating hazy: image 20/20")
    segmentation.evaluate_semantic(predict, data[:2], 2, torch.device("cpu"))  # 4 s: silent
    assert capsys.readouterr().err == ""


def test_starting_a_loader_iterator_leaves_the_global_rng_alone():
    loader = resumable_loader(DATA, BATCH, seed=0)
    state = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- optimizer and other state


def stepped(make_opt, steps=3):
    torch.manual_seed(0)
    model = tiny_net().eval()
    opt = make_opt(model)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
    return model, opt


OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.85, 0.99), weight_decay=0.05, amsgrad=True),
    "sgd-momentum": lambda m: torch.optim.SGD(
        [{"params": m[0].parameters(), "lr": 0.1}, {"params": m[3].parameters(), "lr": 0.01, "nesterov": True}],
        momentum=0.9,
        dampening=0.0,
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("steps", [0, 3])
def test_optimizer_state_round_trips_exactly(tmp_path, name, steps):
    model, opt = stepped(OPTIMIZERS[name], steps)
    path = save_checkpoint(tmp_path, 7, {"m": model}, optimizer=opt)
    fresh_model = tiny_net()
    fresh_opt = OPTIMIZERS[name](fresh_model)
    if steps:
        assert fresh_opt.state_dict() != opt.state_dict()
    assert load_checkpoint(path, {"m": fresh_model}, optimizer=fresh_opt).step == 7
    assert_same_tree(fresh_opt.state_dict(), opt.state_dict())
    assert_same_tree(fresh_model.state_dict(), model.state_dict())


def test_step_epoch_extra_and_scheduler_round_trip(tmp_path):
    model, opt = stepped(OPTIMIZERS["adamw"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(4):
        opt.step()
        sched.step()
    extra = {"args": {"lr": 3e-4, "name": "demo", "sizes": (64, 64)}, "best": torch.tensor(0.25), 3: [None, True]}
    path = save_checkpoint(tmp_path, 40, {"m": model}, optimizer=opt, scheduler=sched, epoch=5, extra=extra)
    new_opt = OPTIMIZERS["adamw"](tiny_net())
    new_sched = torch.optim.lr_scheduler.CosineAnnealingLR(new_opt, T_max=10)
    resumed = load_checkpoint(path, {"m": tiny_net()}, optimizer=new_opt, scheduler=new_sched)
    assert (resumed.step, resumed.epoch) == (40, 5)
    assert_same_tree(resumed.extra, extra)
    assert_same_tree(new_sched.state_dict(), sched.state_dict())


TREES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**62), 2**62)
    | st.floats(allow_nan=True)
    | st.text(max_size=5)
    | st.builds(lambda v: torch.tensor(v), st.lists(st.floats(-1e6, 1e6, width=32), max_size=3)),
    lambda inner: st.lists(inner, max_size=3)
    | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(min_size=1, max_size=4) | st.integers(0, 99), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=10)
@given(tree=TREES)
def test_packed_tree_survives_a_safetensors_file_unchanged(tmp_path_factory, tree):
    tensors = {}
    header = json.dumps(train.checkpoints._pack({"x": tree}, "extra", tensors))
    path = tmp_path_factory.mktemp("tree") / "t.safetensors"
    save_file(tensors, str(path))
    loaded = load_file(str(path))
    assert_same_tree(train.checkpoints._unpack(json.loads(header), loaded)["x"], tree)


def test_unstorable_values_are_named():
    with pytest.raises(TypeError, match=r"extra/f: cannot store a function"):
        train.checkpoints._pack({"f": lambda: 0}, "extra", {})
    with pytest.raises(TypeError, match="dict keys must be str or int"):
        train.checkpoints._pack({(1, 2): 0}, "extra", {})


# ---------------------------------------------------------------- errors and atomicity


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors", {"m": tiny_net()})
    with pytest.raises(CheckpointError, match="None: no such checkpoint"):
        load_checkpoint(latest_checkpoint(tmp_path), {"m": tiny_net()})


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0])
def test_truncated_checkpoint_raises_naming_the_file(tmp_path, keep):
    model, opt = stepped(OPTIMIZERS["adamw"])
    path = save_checkpoint(tmp_path, 1, {"m": model}, optimizer=opt)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=f"{path.name}: corrupt or truncated"):
        load_checkpoint(path, {"m": model}, optimizer=opt)


def test_garbage_and_foreign_files_raise_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="garbage.safetensors: corrupt"):
        load_checkpoint(garbage, {"m": tiny_net()})
    foreign = tmp_path / "weights.safetensors"
    save_file(tiny_net().state_dict(), str(foreign))
    with pytest.raises(CheckpointError, match="weights.safetensors: a safetensors file, but not a unet_seg"):
        load_checkpoint(foreign, {"m": tiny_net()})


def test_state_dict_mismatch_names_keys_and_model(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"head": tiny_net()})
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(CheckpointError, match=r"(?s)model 'head'.*missing keys.*2\.weight.*unexpected keys.*3\.weight"):
        load_checkpoint(path, {"head": other})
    with pytest.raises(CheckpointError, match=r"no state for model\(s\) \['unet'\]"):
        load_checkpoint(path, {"unet": tiny_net()})
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(path, {"head": tiny_net()}, optimizer=torch.optim.SGD(tiny_net().parameters(), lr=0.1))


def test_optimizer_of_another_shape_raises_naming_the_file(tmp_path):
    model, opt = stepped(OPTIMIZERS["adamw"])
    path = save_checkpoint(tmp_path, 1, {"m": model}, optimizer=opt)
    wrong = torch.optim.AdamW(tiny_net()[0].parameters())
    with pytest.raises(CheckpointError, match=f"{path.name}: the optimizer state does not fit"):
        load_checkpoint(path, {"m": tiny_net()}, optimizer=wrong)


def test_failed_write_leaves_the_old_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    model, opt = stepped(OPTIMIZERS["adamw"])
    path = save_checkpoint(tmp_path, 5, {"m": model}, optimizer=opt)
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(train.checkpoints, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 5, {"m": tiny_net()}, optimizer=opt)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 6, {"m": tiny_net()}, optimizer=opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert path.read_bytes() == before


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "table.md"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["table.md"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writers_give_files_the_users_umask(tmp_path, umask):
    """safetensors' save_file writes through a 0600 temporary file: checkpoints, save_pretrained
    folders and exports must still get the mode a plain open() gives, so collaborators can read them."""
    from unet_seg.files import atomic_folder
    from unet_seg.hub import save_component

    previous = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        checkpoint = save_checkpoint(tmp_path / "run", 1, {"m": tiny_net()})
        save_component({"w": torch.zeros(2)}, {"a": 1}, tmp_path / "pretrained", "model")
        with atomic_folder(tmp_path / "export") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected
    written = [checkpoint, *(tmp_path / "pretrained").iterdir(), tmp_path / "export" / "model.safetensors"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(expected) for p in written}


def test_keep_last_deletes_only_older_checkpoints(tmp_path):
    model = tiny_net()
    (tmp_path / "notes.txt").write_text("mine")
    for step in (100, 5, 20, 300):
        save_checkpoint(tmp_path, step, {"m": model}, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["notes.txt", checkpoint_path(tmp_path, 100).name, checkpoint_path(tmp_path, 300).name]
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 300)
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, {"m": model}, keep_last=0)


def test_checkpoints_store_the_unwrapped_module(tmp_path):
    model = tiny_net()
    compiled = maybe_compile(model, enabled=True)
    assert unwrap(compiled) is model
    path = save_checkpoint(tmp_path, 1, {"m": compiled})
    fresh = tiny_net()
    load_checkpoint(path, {"m": fresh})
    assert_same_tree(fresh.state_dict(), model.state_dict())


# ---------------------------------------------------------------- seeding and loop helpers


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


@given(seed=st.integers(0, 2**40), rank=st.integers(0, 7))
def test_seed_everything_makes_all_rngs_repeat_and_ranks_differ(seed, rank):
    seed_everything(seed, rank)
    first = draws()
    seed_everything(seed, rank)
    assert draws() == first
    seed_everything(seed, rank + 1)
    other = draws()
    assert all(a != b for a, b in zip(other, first))


def test_rank_streams_never_coincide_and_rank_0_is_the_one_process_stream():
    seeds = {train.rank_seed(seed, rank) for seed in range(64) for rank in range(8)}
    assert len(seeds) == 64 * 8  # `seed + rank` would give rank 1 of seed 0 the stream of seed 1
    assert all(train.rank_seed(seed, 0) == seed for seed in (0, 7, 2**40))
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("fail", [False, True])
def test_same_init_on_every_rank_builds_the_same_then_gives_each_rank_its_own_stream(monkeypatch, fail):
    import unet_seg.train.rng as rng

    built, after = [], []
    for rank in (0, 1):
        monkeypatch.setattr(rng, "_rank", lambda: rank)
        seed_everything(5, rank)
        torch.rand(rank + 1)  # the ranks' streams were at different places before
        try:
            with train.same_init_on_every_rank(5):
                built.append(tiny_net().state_dict())
                if fail:
                    raise RuntimeError("boom")
        except RuntimeError:
            pass
        after.append(draws())
        seed_everything(5, rank)
        assert draws() == after[-1]  # each rank's own stream from (seed, rank), from its start
    assert_same_tree(built[0], built[1])
    assert all(a != b for a, b in zip(*after))


def test_seed_everything_rejects_negative_values():
    with pytest.raises(ValueError, match="seed and rank must be >= 0"):
        seed_everything(-1)


def test_single_process_defaults():
    if "RANK" in os.environ:
        pytest.skip("running under torchrun")
    rank, world, local_rank, device = init_distributed()
    cuda = torch.cuda.is_available()
    assert (rank, world, local_rank, device.type) == (0, 1, 0, "cuda" if cuda else "cpu") and is_main()
    assert isinstance(progress(range(3)), train.LineProgress)  # pytest's stderr is not a terminal: plain lines
    assert (maybe_compile(tiny_net) is tiny_net) != cuda  # without CUDA: eager unless asked
    assert maybe_compile(tiny_net, enabled=False) is tiny_net


def test_compiling_keeps_the_compile_cache_in_a_persistent_folder_unless_one_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    maybe_compile(tiny_net, enabled=False)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # nothing compiled, nothing set
    maybe_compile(tiny_net, enabled=True, backend="eager")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "unet_seg" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert train.compile_cache_dir() == tmp_path / "mine"  # the user's choice stands


def test_check_finite_everywhere_single_process():
    loss = torch.tensor(0.5)
    assert check_finite_everywhere(loss, "loss") is loss
    with pytest.raises(FloatingPointError, match="dice is not finite"):
        check_finite_everywhere(torch.tensor([1.0, float("inf")]), "dice")


def test_autocast_is_off_on_cpu_unless_asked():
    x = randn(2, 4, seed=12)
    with autocast("cpu"):
        assert (x @ x.T).dtype == torch.float32
    with autocast("cpu", enabled=True):
        assert (x @ x.T).dtype == torch.bfloat16


def test_write_metrics_flat_and_nested(tmp_path):
    printed = write_metrics({"mIoU": torch.tensor(51.25), "IoU/cat": float("nan"), "images": 12}, tmp_path / "m", title="Eval")
    assert json.loads((tmp_path / "m.json").read_text()) == {"mIoU": 51.25, "IoU/cat": None, "images": 12}
    md = (tmp_path / "m.md").read_text()
    assert md.startswith("## Eval\n") and "| mIoU | 51.25 |" in md and "| IoU/cat | – |" in md
    assert printed == md  # what a recipe prints is what it wrote
    write_metrics({"ours": {"mIoU": 51.2, "FB-IoU": 70.0}, "baseline": {"mIoU": 12.0}}, tmp_path / "t")
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines == ["| | mIoU | FB-IoU |", "|---|---|---|", "| ours | 51.2 | 70 |", "| baseline | 12 | – |"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.md", "t.json", "t.md"]


def test_write_metrics_rejects_bad_values(tmp_path):
    with pytest.raises(TypeError, match="metric miou: expected a number"):
        write_metrics({"miou": [1, 2]}, tmp_path / "m")
    with pytest.raises(ValueError, match="metric iou: a tensor must hold one value"):
        write_metrics({"iou": torch.zeros(3)}, tmp_path / "m")
    with pytest.raises(ValueError, match="non-empty dict"):
        write_metrics({}, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- two processes (gloo)

WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from unet_seg.train import (barrier, check_finite_everywhere, cleanup_distributed, init_distributed, is_main,
                                load_checkpoint, print0, save_checkpoint, seed_everything, write_metrics)

    out = Path(sys.argv[1])
    rank, world, local_rank, device = init_distributed()
    seed_everything(0, rank)
    model = torch.nn.Linear(2, 2)
    torch.rand(5)
    path = save_checkpoint(out / "ckpt", 3, {"m": model})   # collective: rank 0 writes, all wait
    expected = torch.rand(4)                                 # what this rank draws after the save
    seed_everything(99, rank)
    step = load_checkpoint(path, {"m": model}).step          # every rank reads; own RNG back
    after = torch.rand(4)
    write_metrics({"rank": rank}, out / "metrics")           # rank 0 only
    print0("printed by rank", rank)
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)
    try:
        check_finite_everywhere(loss, "loss")
        raised = ""
    except FloatingPointError as e:
        raised = str(e)
    barrier()
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "local_rank": local_rank, "device": str(device), "main": is_main(),
        "step": step, "rng_restored": torch.equal(after, expected), "draw": expected.tolist(), "raised": raised}))
    cleanup_distributed()
    """
)


def test_two_gloo_processes_share_one_checkpoint_and_write_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    cmd.append(str(tmp_path))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, seen in enumerate(ranks):
        assert (seen["rank"], seen["world"], seen["local_rank"], seen["device"]) == (r, 2, r, "cpu")
        assert seen["main"] == (r == 0) and seen["step"] == 3 and seen["rng_restored"]
    assert ranks[0]["draw"] != ranks[1]["draw"]  # per-rank RNG streams, each restored
    assert "loss is not finite on another rank" in ranks[0]["raised"]
    assert ranks[1]["raised"].startswith("loss is not finite: [nan]")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"rank": 0}
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step_000000003.safetensors"]
    assert result.stdout.count("printed by rank") == 1 and "printed by rank 0" in result.stdout

    # resumed by one process: the two saved streams cannot both continue; a third one, the same each time
    if "RANK" in os.environ:
        return
    resumed = []
    for _ in range(2):
        seed_everything(0)
        with pytest.warns(UserWarning, match="written by 2 process.*this run has 1.*random stream restarts"):
            load_checkpoint(tmp_path / "ckpt" / "step_000000003.safetensors", {"m": torch.nn.Linear(2, 2)})
        resumed.append(torch.rand(4).tolist())
    assert resumed[0] == resumed[1]
    seed_everything(0)
    assert resumed[0] not in (ranks[0]["draw"], ranks[1]["draw"], torch.rand(4).tolist())


# ---------------------------------------------------------------- the recipe runtime


def test_run_start_resume_and_finish_in_one_process(tmp_path, capsys):
    import argparse

    from unet_seg.train import finish_run, load_latest, resume_latest, start_run, wrap_for_training

    if "RANK" in os.environ:
        pytest.skip("running under torchrun")
    args = argparse.Namespace(demo=True, demo_reason=None, seed=3, out=tmp_path / "run")
    run = start_run(args, demo="tiny things", real="--model x")
    assert (run.rank, run.world) == (0, 1) and (tmp_path / "run").is_dir()
    assert "DEMO: tiny things, CPU (1 thread; OMP_NUM_THREADS=N for more), no download (real runs: --model x)" in capsys.readouterr().out
    drawn = torch.rand(3)
    seed_everything(3)
    assert torch.equal(drawn, torch.rand(3))  # start_run seeded rank 0 with args.seed

    model = tiny_net()
    opt = torch.optim.AdamW(model.parameters())
    assert resume_latest(args.out, {"net": model}, optimizer=opt) == 0  # nothing to resume: untouched
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_latest(args.out, {"net": model})
    save_checkpoint(args.out, 5, {"net": model}, optimizer=opt)
    fresh = tiny_net()
    assert resume_latest(args.out, {"net": fresh}, optimizer=torch.optim.AdamW(fresh.parameters())) == 5
    assert_same_tree(fresh.state_dict(), model.state_dict())
    again = tiny_net()
    load_latest(args.out, {"net": again})
    assert_same_tree(again.state_dict(), model.state_dict())
    assert wrap_for_training(model, compile=False) is model  # one process: no DDP

    metrics = {"ours": {"mIoU": 51.5}, "baseline": {"mIoU": 12.0}}
    assert finish_run(run, metrics, out=args.out, title="T", wrote="x.png", train_seconds=2.0) is metrics
    printed = capsys.readouterr().out
    assert "| ours | 51.5 |" in printed and "train 2 s, total" in printed and "x.png" in printed and "note:" not in printed
    assert json.loads((args.out / "metrics.json").read_text()) == metrics


@pytest.mark.parametrize("demo, steps, noted", [(True, 20, True), (True, 149, True), (True, 150, False), (False, 20, False)])
def test_a_demo_far_shorter_than_its_default_says_at_its_end_what_it_cannot_show(tmp_path, capsys, demo, steps, noted):
    import argparse

    from unet_seg.train import finish_run, start_run

    if "RANK" in os.environ:
        pytest.skip("running under torchrun")
    args = argparse.Namespace(demo=demo, demo_reason=None, seed=0, out=tmp_path, steps=steps, demo_steps=300)
    finish_run(start_run(args, demo="d", real="r"), {"x": {"mIoU": 1.0}}, out=tmp_path, title="T")
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"note: {steps} steps is a short demo (its default is 300): possibly too short to show the method:") == noted


@pytest.mark.parametrize("compile", [True, False])
def test_a_compiling_run_says_on_its_first_line_that_the_first_compile_takes_minutes(tmp_path, capsys, monkeypatch, compile):
    import argparse

    from unet_seg.train import start_run

    if "RANK" in os.environ:
        pytest.skip("running under torchrun")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    start_run(argparse.Namespace(demo=False, demo_reason=None, seed=0, out=tmp_path, compile=compile), demo="d", real="r")
    first = (capsys.readouterr().out.splitlines() or [""])[0]
    assert first.startswith("compiling: about 2-5 min the first time") == compile
    assert (str(tmp_path / "cache") in first) == compile


def test_rank_share_and_head_of_one_process():
    from unet_seg.train import head, rank_and_world, rank_share

    if "RANK" in os.environ:
        pytest.skip("running under torchrun")
    assert rank_and_world() == (0, 1)
    assert list(rank_share(DATA).indices) == list(range(len(DATA)))
    assert list(head(DATA, 5).indices) == [0, 1, 2, 3, 4] and len(head(DATA, 10**6)) == len(DATA)


def test_evaluation_is_eval_mode_on_its_own_rng_and_leaves_the_run_unchanged():
    from unet_seg.train import evaluation

    model = tiny_net().train()
    torch.manual_seed(1)
    expected_after = torch.rand(3)
    torch.manual_seed(1)
    with evaluation(model, seed=7):
        assert not model.training
        inside = torch.rand(3)
    assert model.training and torch.equal(torch.rand(3), expected_after)  # the global stream did not move
    torch.manual_seed(7)
    assert torch.equal(inside, torch.rand(3))  # the block drew from a stream seeded 7
    with pytest.raises(RuntimeError), evaluation(model):
        raise RuntimeError("boom")
    assert model.training  # restored on errors too


# ---------------------------------------------------------------- the sanity check before a real run


def run_with_sanity_check(out, check: bool, evaluate=None, train_fails=False, steps=6):
    """`run_training`'s loop with `sanity_check` before it -> (losses, model, optimizer and scheduler
    states, the RNG draw after training, the sanity report)."""
    import argparse

    from unet_seg.train import sanity_check

    args = argparse.Namespace(demo=False, no_sanity_check=not check, steps=steps, save_every=3)
    seed_everything(0)
    model = tiny_net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    loader = resumable_loader(DATA, BATCH, seed=0)

    def one_step(batch):
        x, y = batch
        if train_fails:
            raise FloatingPointError("loss is not finite: [nan]")
        scale = 1 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        loss = F.mse_loss(model(x + 0.05 * torch.randn_like(x)) * scale, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return loss.detach()

    targets = {"val": TensorDataset(torch.ones(5, 3, 6, 10), torch.zeros(5)), "test": TensorDataset(torch.ones(7, 3, 4, 4))}
    evaluate = evaluate or (lambda data: [model(torch.ones(1, 4)) for _ in data])
    report = sanity_check(args, out=out, step=0, loader=loader, train=one_step, models={"net": model}, optimizer=opt,
                          scheduler=sched, evaluate=evaluate, targets=targets)  # fmt: skip
    losses = torch.stack([one_step(batch) for _, _, batch in training_batches(loader, 0, steps)])
    return losses, model.state_dict(), opt.state_dict(), sched.state_dict(), torch.rand(3), report


def test_sanity_check_leaves_the_run_as_it_would_have_been(tmp_path, capsys):
    checked = run_with_sanity_check(tmp_path / "a", True)
    printed = capsys.readouterr().out
    plain = run_with_sanity_check(tmp_path / "b", False)
    assert plain[-1] is None and checked[-1] is not None
    for a, b in zip(checked[:-1], plain[:-1]):
        assert_same_tree(a, b)  # losses, weights, optimizer, scheduler, the RNG afterwards
    assert list((tmp_path / "a").iterdir()) == []  # its checkpoint folder is gone
    assert printed.count("sanity check passed in") == 1
    assert "(2 training steps, a checkpoint written and read back, one item of val 10x6, test 4x4); 6 steps ≈" in printed
    report = checked[-1]
    assert report.step_seconds > 0 and report.train_seconds >= 6 * report.step_seconds and report.eval_seconds > 0


def test_a_demo_prints_the_sanity_checks_projection_as_its_time_on_this_machine_unless_short(tmp_path, capsys):
    from unet_seg.train import sanity_check

    model = tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def one_step(batch):
        loss = F.mse_loss(model(batch[0]), batch[1])
        opt.zero_grad()
        loss.backward()
        opt.step()

    targets = {"val": TensorDataset(torch.ones(5, 3, 6, 10))}
    kw = dict(out=tmp_path, step=0, loader=resumable_loader(DATA, BATCH, seed=0), train=one_step, models={"m": model}, optimizer=opt,
              evaluate=lambda data: [model(torch.ones(1, 4)) for _ in data], targets=targets)  # fmt: skip
    report = sanity_check(argparse.Namespace(demo=True, steps=40, save_every=10), **kw)
    out = capsys.readouterr().out
    assert re.fullmatch(r"demo: about \d+ s on this machine \(40 steps ≈ \d+ s, evaluation ≈ \d+ s\)\n", out), out
    assert report.train_seconds >= 40 * report.step_seconds and report.eval_seconds > 0
    assert_same_tree(dict(model.state_dict()), before)  # put back as it was
    sanity_check(argparse.Namespace(demo=True, steps=40, save_every=10), **kw, trainings=2)  # and its control model
    out = capsys.readouterr().out
    assert re.fullmatch(r"demo: about \d+ s on this machine \(this training: 40 steps ≈ \d+ s, evaluation ≈ \d+ s; "
                        r"2 trainings in all\)\n", out), out  # fmt: skip
    assert sanity_check(argparse.Namespace(demo=True, steps=9, save_every=3), **kw) is None  # too short to time
    assert sanity_check(argparse.Namespace(demo=True, steps=40, save_every=10, no_sanity_check=True), **kw) is None
    assert capsys.readouterr().out == ""


def test_sanity_check_failures_name_the_part_and_the_error(tmp_path):
    from unet_seg.errors import SanityCheckFailed

    def evaluate(data):
        if len(data[0][0].shape) == 3 and data[0][0].shape[-1] == 4:
            raise ValueError("latent sides must be multiples of 8")

    with pytest.raises(SanityCheckFailed, match=r"^sanity check failed evaluating one item of test 4x4: ValueError: latent sides must "
                       r"be multiples of 8 \(--no-sanity-check skips the check\)$"):  # fmt: skip
        run_with_sanity_check(tmp_path, True, evaluate=evaluate)
    with pytest.raises(SanityCheckFailed, match="in training step 1 or 2: FloatingPointError: loss is not finite"):
        run_with_sanity_check(tmp_path, True, train_fails=True)


def test_a_failed_sanity_check_ends_the_recipe_with_one_line_and_status_1(capsys):
    from unet_seg.cli import run
    from unet_seg.errors import SanityCheckFailed

    def main():
        raise SanityCheckFailed("sanity check failed evaluating one item of bdd100k 1280x720: ValueError: x")

    with pytest.raises(SystemExit) as stop:
        run(main, prog="diff_gta2cs.py")
    assert stop.value.code == 1
    assert capsys.readouterr().err == "diff_gta2cs.py: error: sanity check failed evaluating one item of bdd100k 1280x720: ValueError: x\n"


SANITY_WORKER = textwrap.dedent(
    """
    import argparse, json, sys
    from pathlib import Path
    import torch
    from torch.utils.data import TensorDataset
    from unet_seg.errors import SanityCheckFailed
    from unet_seg.train import (exit_gloo_process, init_distributed, rank_share, resumable_loader,
                                same_init_on_every_rank, sanity_check, training_batches, wrap_for_training)

    out = Path(sys.argv[1])
    rank, world, _, _ = init_distributed()
    with same_init_on_every_rank(0):
        model = torch.nn.Linear(4, 1)
    forward = wrap_for_training(model, compile=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = resumable_loader(TensorDataset(torch.randn(16, 4), torch.randn(16, 1)), 2, seed=0)
    seen, fail_on, errors = [], -1, []

    def one_step(batch):
        loss = torch.nn.functional.mse_loss(forward(batch[0] + torch.randn(1)), batch[1])
        opt.zero_grad(); loss.backward(); opt.step()

    def evaluate(data):
        seen.append([float(x[0].flatten()[0]) for x in rank_share(data)])  # every rank the same item
        if rank == fail_on:
            raise RuntimeError("out of memory")

    args = argparse.Namespace(demo=False, no_sanity_check=False, steps=4, save_every=2)
    targets = {"val": TensorDataset(torch.arange(5.0)[:, None, None, None].expand(5, 3, 8, 8))}
    for fail_on in (-1, 1):  # passes; then fails on rank 1 alone
        try:
            sanity_check(args, out=out, step=0, loader=loader, train=one_step, models={"m": model}, optimizer=opt,
                         evaluate=evaluate, targets=targets)
            errors.append("")
        except SanityCheckFailed as e:
            errors.append(str(e))
    for _, _, batch in training_batches(loader, 0, 4):
        one_step(batch)
    (out / f"rank{rank}.json").write_text(json.dumps({"errors": errors, "seen": seen, "weight": model.weight.tolist()}))
    exit_gloo_process(0)  # as unet_seg.cli.run ends a recipe: the last collectives came from a backward just now
    """
)


def test_sanity_check_on_two_gloo_processes(tmp_path):
    """Both ranks evaluate the same item and end with the same weights; rank 0 prints; a failure
    on rank 1 alone stops both, naming it."""
    script = tmp_path / "worker.py"
    script.write_text(SANITY_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["seen"] == ranks[1]["seen"] == [[0.0], [0.0]] and ranks[0]["weight"] == ranks[1]["weight"]
    assert result.stdout.count("sanity check passed in") == 1 and "on 2 process(es)" in result.stdout
    failed = "sanity check failed evaluating one item of val 8x8 on rank 1: RuntimeError: out of memory (--no-sanity-check skips the check)"
    assert ranks[0]["errors"] == ranks[1]["errors"] == ["", failed]


@pytest.mark.parametrize("exported", [None, "2"])
def test_a_cpu_demo_runs_on_one_thread_unless_the_user_sets_omp_num_threads(tmp_path, monkeypatch, exported):
    """Two OpenMP threads ran the demo's U-Net step 3x slower than one beside one busy process
    (benchmarks/bench_threads.py); a user's OMP_NUM_THREADS wins."""
    import argparse

    from unet_seg.train import start_run

    if "RANK" in os.environ:
        pytest.skip("running under torchrun")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if exported:
        monkeypatch.setenv("OMP_NUM_THREADS", exported)
    torch.set_num_threads(2)
    try:
        start_run(argparse.Namespace(demo=True, demo_reason=None, seed=0, out=tmp_path), demo="d", real="r")
        assert torch.get_num_threads() == (2 if exported else 1)
    finally:
        torch.set_num_threads(1)  # conftest's setting for the rest of this worker
