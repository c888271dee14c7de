"""The DiffewS recipe end to end: it trains, evaluates, writes metrics and the episode grid,
resumes from its checkpoint, runs under 2 gloo processes, and (a shortened demo, ~2 minutes on
2 cores) learns to beat both trivial baselines on held-out classes."""

import functools
import json

import pytest

from unet_seg.train import checkpoint_path

from .helpers import assert_graph_follows_eager, assert_resume_is_exact, load_recipe, run_two_gloo_processes

TINY = ["--demo", "--random-demo-model", "--steps", "2", "--batch-size", "2", "--eval-items", "4", "--save-every", "1"]


def _recipe():
    return load_recipe("diffews_coco20i")


def test_demo_writes_metrics_and_episode_grid(tmp_path, capsys):
    metrics = _recipe().main(TINY + ["--shots", "2", "--val-every", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("DEMO:")
    assert "step 1: 1-shot mIoU" in out and "step 2: 1-shot" not in out  # periodic, and not twice at the end
    expected = {"DiffewS 1-shot", "DiffewS 5-shot", "baseline: support mask", "baseline: all foreground",
                "control: DiffewS 1-shot, supports of the query's other class"}
    assert set(metrics) == expected
    table = json.loads((tmp_path / "metrics.json").read_text())
    assert set(table) == expected
    for row in table.values():
        assert 0 <= row["mIoU"] <= 100 and 0 <= row["FB-IoU"] <= 100
    assert "| DiffewS 1-shot |" in (tmp_path / "metrics.md").read_text()
    assert (tmp_path / "episodes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.glob("step_*.safetensors")] == [checkpoint_path(tmp_path, 2).name]  # a finished demo keeps its last


def test_resume_continues_to_the_same_weights(tmp_path, cpu_only):
    tiny = TINY + ["--shots", "3"]  # draws a shot count and supports from the global RNG each step
    evaluating = ["--val-every", "1", "--val-items", "2"]  # periodic evaluation must not perturb the run
    assert_resume_is_exact(_recipe().main, tiny, tmp_path, straight_only=evaluating)


def test_ctrl_c_checkpoints_and_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path, cpu_only, monkeypatch):
    import os
    import signal

    import torch
    from safetensors.torch import load_file

    from unet_seg.errors import TrainingInterrupted

    recipe = _recipe()
    args = ["--demo", "--random-demo-model", "--steps", "4", "--batch-size", "2", "--eval-items", "4", "--save-every", "100", "--shots", "3"]
    recipe.main(args + ["--out", str(tmp_path / "straight")])
    train_step, calls = recipe.train_step, []

    def step_then_ctrl_c(*a, **kw):
        loss = train_step(*a, **kw)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(recipe, "train_step", step_then_ctrl_c)
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 2; wrote .*step_000000002.safetensors; rerun with --resume"):
        recipe.main(args + ["--out", str(tmp_path / "split")])
    assert [p.name for p in (tmp_path / "split").glob("step_*")] == [checkpoint_path(tmp_path, 2).name]
    monkeypatch.setattr(recipe, "train_step", train_step)
    recipe.main(args + ["--out", str(tmp_path / "split"), "--resume"])
    a, b = (load_file(checkpoint_path(tmp_path / run, 4)) for run in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_shortened_demo_beats_both_baselines_on_held_out_classes(tmp_path):
    metrics = _recipe().main(["--demo", "--random-demo-model", "--steps", "150", "--eval-items", "40", "--out", str(tmp_path)])
    ours = metrics["DiffewS 1-shot"]
    baselines = [metrics["baseline: support mask"], metrics["baseline: all foreground"]]
    assert ours["mIoU"] > 2 * max(b["mIoU"] for b in baselines), metrics
    assert ours["FB-IoU"] > max(b["FB-IoU"] for b in baselines), metrics


def test_bad_size_is_refused_with_a_clear_message(capsys):
    """Any multiple of 8 is a size the VAE and the U-Net take (72 -> 9×9 latents)."""
    assert _recipe().parse_args(["--demo", "--size", "72"]).size == 72
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--demo", "--size", "68"])
    assert "multiple of 8" in capsys.readouterr().err


def test_two_gloo_processes_share_weights_draw_own_noise_resume_exactly_and_split_the_evaluation(tmp_path):
    run_two_gloo_processes("diffews_coco20i", TINY + ["--shots", "3"], tmp_path, grid="episodes.png", timeout=240)



def test_official_defaults(tmp_path):
    """All support tokens at K-shot test unless --support-sampling; the paper's strict schedule;
    the launcher's learning rate."""
    args = _recipe().parse_args(["--model", "m", "--data-root", str(tmp_path)])
    assert not args.support_sampling and args.steps == 10000 and args.lr == 1e-5 and args.shots == 1
    assert _recipe().parse_args(["--demo", "--random-demo-model", "--support-sampling"]).support_sampling


def test_k_shot_prediction_reads_every_support_token_unless_sampling():
    """With all support tokens the 5-shot prediction is deterministic and depends on the fifth
    support; with sampling it changes with the RNG."""
    import torch

    from unet_seg.demo import BlockCodec
    from unet_seg.models import TINY_SD2, UNet

    torch.manual_seed(0)
    unet, vae = UNet(TINY_SD2).add_support_conv_in(8).eval(), BlockCodec()
    context = torch.randn(1, 2, TINY_SD2.context_dim)
    query, supports = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 5, 3, 64, 64) * 2 - 1
    support_masks = (torch.rand(2, 5, 64, 64) > 0.5).long()
    r = _recipe()
    x, _ = r.unet_input(vae, query, supports, support_masks, sample=False)
    with torch.no_grad():
        full = r.query_prediction(unet, x, context, 5, subsample=False)
        again = r.query_prediction(unet, x, context, 5, subsample=False)
        x2, _ = r.unet_input(vae, query, torch.cat([supports[:, :4], supports[:, :1]], 1), support_masks, sample=False)
        other_fifth = r.query_prediction(unet, x2, context, 5, subsample=False)
        sampled = [r.query_prediction(unet, x, context, 5, subsample=True) for _ in range(2)]
    assert torch.equal(full, again) and not torch.allclose(full, other_fifth)
    assert not torch.allclose(sampled[0], sampled[1])


def test_training_encodes_posterior_samples_and_evaluation_posterior_means():
    """As the official script: the target −E(query mask) and the inputs are VAE posterior samples
    in training; evaluation encodes posterior means."""
    import torch

    from unet_seg.models import TINY_SD2, TINY_VAE, AutoencoderKL, UNet

    torch.manual_seed(0)
    r = _recipe()
    unet, vae = UNet(TINY_SD2).add_support_conv_in(8), AutoencoderKL(TINY_VAE).eval()
    calls = []
    encode = vae.encode
    vae.encode = lambda x, sample=False, **kw: calls.append(sample) or encode(x, sample=sample, **kw)
    query, supports = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 1, 3, 64, 64) * 2 - 1
    query_mask, support_masks = (torch.rand(1, 64, 64) > 0.5).long(), (torch.rand(1, 1, 64, 64) > 0.5).long()
    context = torch.randn(1, 77, TINY_SD2.context_dim)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    r.train_step(unet, unet, vae, context, opt, query, query_mask, supports, support_masks)
    assert calls and all(calls)
    calls.clear()
    r.predict_masks(unet.eval(), vae, context[:, :2], query, supports, support_masks)
    assert calls and not any(calls)


def test_binarise_follows_the_official_evaluation():
    """8-bit truncation, then channel mean > 0.25 × the maximum over channels and pixels."""
    import torch

    image = torch.full((1, 3, 1, 4), -1.0)
    image[0, 0, 0, 0] = 1.0  # channel maximum 1.0 -> threshold 0.25 on the channel mean
    image[0, :, 0, 1] = -0.5 + 1e-3  # 0.25 + 5e-4 -> 63.8 -> uint8 63 -> 0.247: below
    image[0, :, 0, 2] = -0.49  # 0.255 -> 65: above
    assert _recipe().binarise(image).tolist() == [[[1, 0, 1, 0]]]  # pixel 0: mean 1/3 > 0.25


def test_one_vae_call_encodes_what_separate_calls_encode():
    """unet_input's single VAE call (queries, supports, support masks, query masks) equals one
    encode per kind of image, laid out per episode as [cat(z_q, 0), cat(z_s1, m_s1), ...] (fp32)."""
    import torch

    from unet_seg.codecs import mask_to_latent
    from unet_seg.models import TINY_VAE, AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE).eval()
    g, s, size = 2, 3, 32
    query, supports = torch.rand(g, 3, size, size) * 2 - 1, torch.rand(g, s, 3, size, size) * 2 - 1
    support_masks = (torch.rand(g, s, size, size) > 0.5).long()
    query_mask = (torch.rand(g, size, size) > 0.5).long().masked_fill_(torch.rand(g, size, size) < 0.1, 255)
    with torch.no_grad():
        x, z_query_mask = _recipe().unet_input(vae, query, supports, support_masks, sample=False, query_mask=query_mask)
        x_only, none = _recipe().unet_input(vae, query, supports, support_masks, sample=False)
        z_q, z_s = vae.encode(query), vae.encode(supports.flatten(0, 1)).unflatten(0, (g, s))
        m_s = mask_to_latent(vae, support_masks.flatten(0, 1)).unflatten(0, (g, s))
        expected = torch.cat([torch.cat([z_q, torch.zeros_like(z_q)], 1)[:, None], torch.cat([z_s, m_s], 2)], 1).flatten(0, 1)
        torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_only, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z_query_mask, mask_to_latent(vae, query_mask), rtol=1e-5, atol=1e-5)
    assert none is None and x.shape == (g * (1 + s), 8, size // 8, size // 8)


def test_a_nan_loss_stops_training_after_skipping_its_update(tmp_path, cpu_only, monkeypatch):
    """The loss is read after the step (no host sync inside it): a NaN loss at step 2 raises
    there, its update skipped, and the step-1 checkpoint is the last one written."""
    import torch
    from safetensors.torch import load_file

    recipe = _recipe()
    latent_mse, check_finite_everywhere, make_demo_sd = recipe.latent_mse, recipe.check_finite_everywhere, recipe.demo_sd
    calls, unets, weights = [], [], {}

    def nan_at_step_2(pred, target):
        calls.append(1)
        loss = latent_mse(pred, target)
        return loss * float("nan") if len(calls) == 2 else loss

    def check(loss, name):  # the weights as the step left them, just before the check raises
        weights.update({k: v.clone() for k, v in unets[0].state_dict().items()})
        return check_finite_everywhere(loss, name)

    def demo_sd(*a, **kw):
        sd = make_demo_sd(*a, **kw)
        unets.append(sd.unet)
        return sd

    monkeypatch.setattr(recipe, "latent_mse", nan_at_step_2)
    monkeypatch.setattr(recipe, "check_finite_everywhere", check)
    monkeypatch.setattr(recipe, "demo_sd", demo_sd)
    with pytest.raises(FloatingPointError, match=r"latent MSE is not finite: \[nan\]"):
        recipe.main(TINY + ["--steps", "3", "--out", str(tmp_path)])
    assert [p.name for p in sorted(tmp_path.glob("step_*.safetensors"))] == [checkpoint_path(tmp_path, 1).name]
    saved = load_file(str(checkpoint_path(tmp_path, 1)))
    for key, value in weights.items():  # step 2 changed nothing
        assert torch.equal(value, saved[f"model/unet/{key}"]), key


def test_cuda_graph_needs_a_gpu(tmp_path, cpu_only):
    with pytest.raises(SystemExit, match="--cuda-graph needs a CUDA device"):
        _recipe().main(TINY + ["--cuda-graph", "--out", str(tmp_path)])


def _episode_batches(tmp_path, vae, cache_batch: int):
    """Two 2-shot COCO-20i training episodes at 32² (fake COCO 2014 files): as pixels and as
    posteriors from a latent cache built `cache_batch` images per VAE call."""
    import torch
    from torch.utils.data import default_collate

    from unet_seg.data.coco20i import COCO20i
    from unet_seg.data.fewshot import cached_episodes

    from .fake_datasets import write_coco20i

    episodes = COCO20i(write_coco20i(tmp_path / "COCO2014", train_images=3), 0, "train", shots=2, size=32)
    cached = cached_episodes(episodes, vae, tmp_path / "cache", batch_size=cache_batch)
    keys = ("query", "query_mask", "supports", "support_masks")
    pixels, posts = (default_collate([{k: data[i][k] for k in keys} for i in range(2)]) for data in (episodes, cached))
    assert posts["supports"].shape == (2, 2, 2, 4, 4, 4) and posts["query_mask"].dtype == torch.float32
    return [pixels[k] for k in keys], [posts[k] for k in keys]


def _one_step_each_way(vae, pixels, posts, seed: int = 5):
    """The uncached and the cached training step from the same U-Net, optimiser and RNG state
    -> (loss, weights) of each."""
    import copy

    import torch

    from unet_seg.models import TINY_SD2, UNet

    r = _recipe()
    torch.manual_seed(0)
    unet = UNet(TINY_SD2).add_support_conv_in(8)
    context = torch.randn(1, 77, TINY_SD2.context_dim)
    out = []
    for step, args in ((r.train_step, (vae, context)), (r.cached_train_step, (context,)), ):
        model = copy.deepcopy(unet)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        torch.manual_seed(seed)
        loss = step(model, model, *args, opt, *(pixels if step is r.train_step else posts))
        out.append((loss.detach(), {k: v.clone() for k, v in model.state_dict().items()}))
    return out


def test_cached_and_uncached_training_steps_are_one_step_under_the_same_noise(tmp_path):
    """--cache-dir's step draws z = μ + σ·ε from cached posteriors in the order and dtype of the
    uncached step's VAE call: where the VAE encodes each image alone in both (the cache built one
    image per call, the step's VAE call split per image) the two steps agree bit for bit, loss and
    every weight after the AdamW update; with the step's batched VAE call, to the float rounding
    of batched convolutions (loss measured 2.3e-7 relative; weights 2e-4 apart, twice the lr:
    AdamW's first update is about lr·sign(gradient), and rounding flips the sign of gradients near 0)."""
    import torch

    from unet_seg.models import TINY_VAE, AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(TINY_VAE).eval()
    pixels, posts = _episode_batches(tmp_path, vae, cache_batch=1)
    (loss_a, w_a), (loss_b, w_b) = _one_step_each_way(vae, pixels, posts)
    assert abs(loss_a - loss_b) <= 2e-6 * loss_a
    posterior = vae.posterior
    vae.posterior = lambda img: torch.cat([posterior(x[None]) for x in img])  # one image per VAE call
    (loss_a, w_a), (loss_b, w_b) = _one_step_each_way(vae, pixels, posts)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    (loss_c, _), _ = _one_step_each_way(vae, pixels, posts, seed=6)
    assert not torch.equal(loss_a, loss_c)  # other ε, other latents: the noise is drawn, not cached


def test_cache_dir_is_refused_for_the_demo(capsys):
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--demo", "--cache-dir", "x"])
    assert "--cache-dir caches COCO-20i's VAE posteriors" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_run_with_cache_dir_trains_as_the_uncached_run_and_reuses_its_cache(tmp_path, capsys):
    """`--model <SD folder> --data-root <COCO-20i>` with --cache-dir: the cache is built once (a
    second run encodes nothing) and the step-2 weights are the uncached run's up to the float
    rounding of batched VAE convolutions: AdamW moves a weight by ≈ lr per step whatever the
    gradient's size, so a rounding-flipped sign moves it by 2·lr at most (bound 2·lr·steps), and
    only the few weights whose gradients are near 0 move apart."""
    import torch
    from safetensors.torch import load_file

    from .fake_datasets import write_coco20i
    from .helpers import write_tiny_sd

    data, sd = write_coco20i(tmp_path / "COCO2014", train_images=3), write_tiny_sd(tmp_path / "sd")
    args = ["--model", str(sd), "--data-root", str(data), "--size", "32", "--steps", "2", "--batch-size", "2", "--save-every", "2",
            "--eval-items", "1", "--workers", "0", "--lr", "1e-5"]  # fmt: skip
    cache = ["--cache-dir", str(tmp_path / "cache")]
    for out, extra in (("plain", []), ("cached", cache), ("again", cache)):
        _recipe().main(args + extra + ["--out", str(tmp_path / out)])
        printed = capsys.readouterr().out
        assert ("encoding" in printed) == (out == "cached"), out  # built once, then read
    assert list((tmp_path / "cache").glob("shard_*.safetensors"))
    plain, cached, again = (load_file(str(checkpoint_path(tmp_path / d, 2))) for d in ("plain", "cached", "again"))
    assert all(torch.equal(cached[k], again[k]) for k in cached)
    unet = [k for k in plain if k.startswith("model/unet/")]
    apart = sum(int(((plain[k] - cached[k]).abs() > 1e-7).sum()) for k in unet) / sum(plain[k].numel() for k in unet)
    assert max((plain[k] - cached[k]).abs().max().item() for k in unet) <= 2 * 2 * 1e-5 + 1e-7
    assert apart < 0.01  # measured 9.2e-5; 0.57 with the cached supports and their masks swapped


@pytest.mark.slow
def test_two_gloo_processes_build_one_cache_together_and_train_from_it(tmp_path, capsys):
    """Under torchrun each rank encodes its own shards (rank 0 prints the one build line), both
    ranks train from the whole cache with the same weights, and a later one-process run finds
    every posterior there (it encodes nothing)."""
    from .fake_datasets import write_coco20i
    from .helpers import assert_ranks_hold_the_same_weights, run_torchrun, write_tiny_sd

    data, sd = write_coco20i(tmp_path / "COCO2014", train_images=4), write_tiny_sd(tmp_path / "sd")
    args = ["--model", str(sd), "--data-root", str(data), "--size", "32", "--steps", "2", "--batch-size", "1", "--save-every", "1",
            "--eval-items", "2", "--workers", "0", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    run = run_torchrun("diffews_coco20i", args + ["--out", str(tmp_path / "run")], probe=tmp_path / "probe", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sum("latent cache" in line and "encoding" in line for line in run.stdout.splitlines()) == 1
    assert assert_ranks_hold_the_same_weights(tmp_path / "probe") == [1, 2]
    shards = {int(p.stem.split("_")[1]) for p in (tmp_path / "cache").glob("shard_*.safetensors")}
    assert {s % 2 for s in shards} == {0, 1}  # both ranks' shards
    capsys.readouterr()
    _recipe().main(args + ["--out", str(tmp_path / "one")])  # in this process
    assert "encoding" not in capsys.readouterr().out and (tmp_path / "one" / "metrics.json").is_file()


@pytest.mark.parametrize("cached", [False, True], ids=["encode every step", "latent cache"])
def test_graphed_training_steps_train_as_eager_steps_do(cached):
    """--cuda-graph: the recipe's training step replayed as one CUDA graph follows the eager step
    from the first step on (bf16 autocast, as on a GPU): the loss and every weight after each of 4
    steps that alternate 1 and 2 supports (two graphs), encoding every step or from cached posteriors.
    Runs where a GPU is (CI has none)."""
    import copy

    import torch

    from unet_seg.models import TINY_SD2, TINY_VAE, AutoencoderKL, UNet
    from unet_seg.train import CudaGraphStep

    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a GPU")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    r, dev = _recipe(), torch.device("cuda")
    torch.manual_seed(0)
    unet = UNet(TINY_SD2).add_support_conv_in(8).to(dev).train()
    vae = AutoencoderKL(TINY_VAE).to(dev).eval().requires_grad_(False)
    context = torch.randn(1, 77, TINY_SD2.context_dim, device=dev)
    g = torch.Generator(dev).manual_seed(1)
    query, supports = torch.rand(2, 3, 32, 32, device=dev, generator=g), torch.rand(2, 2, 3, 32, 32, device=dev, generator=g)
    query_mask, support_masks = (torch.rand(2, 32, 32, device=dev, generator=g) > 0.5).long(), (torch.rand(2, 2, 32, 32, device=dev, generator=g) > 0.5).long()
    if cached:  # posteriors (μ, σ) [..., 2, 4, 4, 4]
        post = lambda *shape: torch.stack([torch.randn(*shape, 4, 4, 4, device=dev, generator=g), torch.rand(*shape, 4, 4, 4, device=dev, generator=g)], -4)  # noqa: E731
        episode = (post(2), post(2), post(2, 2), post(2, 2))
    else:
        episode = (query, query_mask, supports, support_masks)
    eager, graphed = unet, copy.deepcopy(unet)
    opts = [torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-3, device=dev), weight_decay=1e-2, fused=True, capturable=True) for m in (eager, graphed)]
    steps = [functools.partial(r.cached_train_step, m, m, context, o) if cached else functools.partial(r.train_step, m, m, vae, context, o) for m, o in zip((eager, graphed), opts)]
    graph_step = CudaGraphStep(steps[1], [graphed], opts[1])
    shots = (1 + i % 2 for i in range(4))
    inputs = ((*episode[:2], episode[2][:, :s].contiguous(), episode[3][:, :s].contiguous()) for s in shots)
    assert_graph_follows_eager(steps[0], graph_step, eager, graphed, inputs)
    assert len(graph_step.graphs) == 2
    graph_step.close()


def test_cuda_graph_is_on_where_the_run_has_a_gpu_and_no_cuda_graph_turns_it_off(tmp_path, monkeypatch, cpu_only):
    """The CUDA graph is the default on a GPU (tested equal to the eager step above); on the CPU the
    run steps eagerly, and --no-cuda-graph is accepted."""
    r = _recipe()
    assert r.parse_args(["--demo"]).cuda_graph is None and r.parse_args(["--demo", "--no-cuda-graph"]).cuda_graph is False
    captured = []
    monkeypatch.setattr(r, "CudaGraphStep", lambda *a, **k: captured.append(a) or a[0])
    r.main(TINY + ["--out", str(tmp_path)])
    assert captured == []  # a CPU run: eager
