"""The DIFF recipe end to end: it trains both branches, evaluates the unconditional one on both
styles, writes metrics and the prediction grid, resumes exactly, runs under 2 gloo processes,
and builds the conditional branch from the class prompts inside their masks only. The demo's
numbers are in the README (it does not show the paper's gain in miniature; no test claims it)."""

import json
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from unet_seg.train import checkpoint_path

from .helpers import assert_graph_follows_eager, assert_resume_is_exact, load_recipe, randn, run_two_gloo_processes, write_tiny_sd

TINY = ["--demo", "--random-demo-model", "--steps", "2", "--pretrain-steps", "2", "--batch-size", "2", "--eval-items", "4", "--save-every", "1"]


def _recipe():
    return load_recipe("diff_gta2cs")


def test_demo_writes_metrics_and_prediction_grid(tmp_path, capsys):
    metrics = _recipe().main(TINY + ["--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("DEMO:")
    table = json.loads((tmp_path / "metrics.json").read_text())
    assert table == metrics
    for row in table.values():
        assert set(row) == {"clean (source style)", "hazy (unseen style)"}
        assert all(0 <= v <= 100 for v in row.values())
    assert (tmp_path / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {p.parent for p in tmp_path.rglob("step_*.safetensors")}
    assert tmp_path in runs and all([p.name for p in run.glob("step_*")] == [checkpoint_path(run, 2).name] for run in runs)  # a finished demo keeps its last


def test_resume_continues_to_the_same_weights(tmp_path, cpu_only):
    weights = assert_resume_is_exact(_recipe().main, TINY + ["--no-baseline"], tmp_path)
    assert any(k.startswith("model/segmenter/") for k in weights)


def test_official_schedule_saves_steps_33_to_3_with_eta_one_from_t_11():
    recipe = _recipe()
    steps, etas, save = recipe.inversion_schedule(recipe.TRAJECTORY, recipe.TIMESTEPS)
    assert len(steps) == 37 and steps[0] == (0, 1) and steps[-1] == (139, 160) and steps[33] == (91, 105)
    assert save == [33, 29, 25, 22, 18, 14, 11, 7, 3]  # the official save_timestep loop indices
    assert etas[:11] == [0.0] * 11 and etas[11:] == [1.0] * 26  # η = 1 for 10 < t < 250


def test_prompt_rows_give_the_empty_prompt_everywhere_and_present_classes_their_masks():
    label = torch.zeros(2, 16, 16, dtype=torch.long)
    label[0, :8] = 9  # image 0: class 9 (prompted, slot 2) in its top half
    label[1] = 5  # image 1: class 5 everywhere, but it is passed as unconditional
    image, prompt, mask = _recipe().prompt_rows([label[0], None], [5, 9], (4, 4), torch.device("cpu"))
    assert image.tolist() == [0, 0, 1] and prompt.tolist() == [0, 2, 0]
    assert (mask[0] == 1).all() and (mask[2] == 1).all()
    assert mask[1, :2].eq(1).all() and mask[1, 2:].eq(0).all()
    with torch.device("meta"):  # a default-device context (the benchmarks build on the GPU in one) moves nothing
        rows = _recipe().prompt_rows([label[0], None], [5, 9], (4, 4), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(rows, (image, prompt, mask)))


def frozen_tiny(recipe, features="trajectory"):
    from argparse import Namespace

    from unet_seg.demo import BlockCodec
    from unet_seg.diffusion import NoiseSchedule
    from unet_seg.models import TINY_SD2, UNet

    torch.manual_seed(0)
    unet = UNet(TINY_SD2).eval()
    args = Namespace(features=features, trajectory=[7, 30, 91, 120], timesteps=[91, 7], prediction_type="as-eps",
                     loss="official", consistency="l2", amp=False, seed=0)  # fmt: skip
    rev = unet.config.channels[::-1]
    channels = [2 * 6 * rev[i] for i in recipe.LEVELS]
    frozen = recipe.Frozen(unet, BlockCodec(), torch.randn(3, 77, TINY_SD2.context_dim), [5, 9], NoiseSchedule.sd(), channels)
    return frozen, args


@pytest.mark.parametrize("features", ["trajectory", "batched"])
def test_level_channels_match_the_features(features):
    recipe = _recipe()
    frozen, args = frozen_tiny(recipe, features)
    label = torch.zeros(64, 64, dtype=torch.long)
    label[:32] = 9
    with torch.no_grad():
        levels = recipe.diffusion_levels(frozen, randn(2, 4, 8, 8, seed=31), recipe.prompt_rows([label, None], [5, 9], (8, 8), "cpu"), args)
    assert [f.shape[1] for f in levels] == frozen.level_channels and all(f.shape[0] == 2 for f in levels)
    assert [f.shape[-1] for f in levels] == [8, 4, 2]  # strides 8, 16, 32 of a 64-pixel image (fine to coarse)


@pytest.mark.parametrize("features", ["trajectory", "batched"])
def test_prediction_on_images_whose_latents_have_odd_sides(features):
    """Whole-image evaluation at BDD100K's, ACDC's or Mapillary's proportions (1280×720 -> 160×90
    latents): here 72×40 -> 9×5, U-Net levels 5×3 and 3×2, logits at stride 4."""
    recipe = _recipe()
    frozen, args = frozen_tiny(recipe, features)
    args.seed = 0
    torch.manual_seed(0)
    model = recipe.Segmenter(frozen.level_channels, 6, (32, 16, 8), 8, 8, 4, (1, 2, 2, 2)).eval()
    logits = recipe.predict_logits(model, frozen, torch.rand(1, 3, 72, 40) * 2 - 1, args)
    assert logits.shape == (1, 6, 18, 10) and torch.isfinite(logits).all()


def test_batched_approximation_fuses_the_class_prompts_inside_their_masks_only():
    recipe = _recipe()
    frozen, args = frozen_tiny(recipe, "batched")
    z0 = randn(1, 4, 8, 8, seed=32).expand(2, -1, -1, -1)
    label = torch.zeros(64, 64, dtype=torch.long)
    label[:32] = 5  # class 5 (prompted) in the top half
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        cond, uncond = (recipe.diffusion_levels(frozen, z0[:1], recipe.prompt_rows([y], [5, 9], (8, 8), "cpu"), args, g()) for y in (label, None))
    for c, u in zip(cond, uncond):
        h = u.shape[-2]
        torch.testing.assert_close(c[..., h // 2 :, :], u[..., h // 2 :, :])  # outside the mask: the "" prompt
        assert not torch.allclose(c[..., : h // 2, :], u[..., : h // 2, :])  # inside: "" and the class prompt


@pytest.mark.parametrize("loss, keys", [("official", {"CE cond", "CE uncond", "consistency"}), ("paper", {"CE cond", "consistency"})])
@pytest.mark.parametrize("consistency", ["l2", "kl"])
def test_train_step_losses_follow_the_official_code_or_eq_5(loss, keys, consistency):
    recipe = _recipe()
    frozen, args = frozen_tiny(recipe)
    args.loss, args.consistency = loss, consistency
    torch.manual_seed(0)
    model = recipe.Segmenter(frozen.level_channels, 6, (32, 16, 8), 8, 8, 4, (1, 2, 2, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    image, label = torch.rand(1, 3, 64, 64) * 2 - 1, torch.randint(0, 6, (1, 64, 64))
    before = [p.detach().clone() for p in model.parameters()]
    loss, losses = train_step(recipe, model, frozen, opt, image, label, True, args)
    assert set(losses) == keys and all(v == v and v >= 0 for v in losses.values())
    assert loss.item() == pytest.approx(sum(v.item() for v in losses.values()))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    only_uncond = train_step(recipe, model, frozen, opt, image, label, False, args)[1]
    assert set(only_uncond) == {"CE uncond"}


def train_step(recipe, model, frozen, opt, image, label, ipkl, args):
    return recipe.train_step(model, frozen, opt, image, label, recipe.branch_rows(frozen, label, ipkl, image.device), ipkl, args)


def recorded_segmenter(recipe, frozen):
    """A seeded tiny Segmenter whose every output is appended to `calls`, its AdamW, and one 64² image
    and label -> (record, calls, opt, image, label)."""
    torch.manual_seed(0)
    model = recipe.Segmenter(frozen.level_channels, 6, (32, 16, 8), 8, 8, 4, (1, 2, 2, 2))
    calls = []
    record = lambda levels: calls.append(model(levels)) or calls[-1]  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    return record, calls, opt, torch.rand(1, 3, 64, 64) * 2 - 1, torch.randint(0, 6, (1, 64, 64))


def test_kl_consistency_is_the_official_clamp_of_the_weighted_kl():
    recipe = _recipe()
    frozen, args = frozen_tiny(recipe)
    args.consistency = "kl"
    record, calls, opt, image, label = recorded_segmenter(recipe, frozen)
    losses = train_step(recipe, record, frozen, opt, image, label, True, args)[1]
    student, teacher = (x.detach().double() for x in calls)  # unconditional first, then conditional
    kl = (teacher.softmax(1) * (teacher.log_softmax(1) - student.log_softmax(1))).sum().item()  # batchmean, B = 1
    assert 0.5 < kl  # where the two orders differ: the old 0.1 · min(KL, 0.5) would give 0.05
    assert losses["consistency"].item() == pytest.approx(min(0.1 * kl, 0.5), rel=1e-4)


@pytest.mark.parametrize("amp, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_trained_parts_run_in_fp32_as_released_unless_amp(monkeypatch, amp, dtype):
    recipe = _recipe()
    frozen, args = frozen_tiny(recipe)
    args.amp = amp
    # stand in for a GPU: autocast on (bf16) wherever the recipe leaves it to the device
    monkeypatch.setattr(recipe, "autocast", lambda device, enabled=None: torch.autocast("cpu", torch.bfloat16, enabled=enabled is not False))
    record, calls, opt, image, label = recorded_segmenter(recipe, frozen)
    train_step(recipe, record, frozen, opt, image, label, True, args)
    recipe.predict_logits(record, frozen, image, args)
    assert [c.dtype for c in calls] == [dtype] * 3  # both training branches and inference


def test_poly_schedule_warms_up_then_decays_to_zero():
    f = _recipe().poly_with_warmup(100, 10)
    assert f(0) == pytest.approx(1e-6) and f(5) == pytest.approx(0.5 * 0.95, rel=1e-4)
    assert f(10) == pytest.approx(0.9) and f(100) == 0.0


def test_bad_size_is_refused_with_a_clear_message(capsys):
    """Any multiple of 8 is a size the VAE and the U-Net take (72 -> 9×9 latents)."""
    assert _recipe().parse_args(["--demo", "--size", "72"]).size == 72
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--demo", "--size", "68"])
    assert "multiple of 8" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--trajectory", "7", "30", "91", "120"], ["--prediction-type", "model"]])
def test_batched_features_refuse_the_trajectory_only_options(extra, capsys):
    recipe = _recipe()
    assert recipe.parse_args(["--demo", "--random-demo-model", "--features", "batched"]).features == "batched"
    with pytest.raises(SystemExit):
        recipe.parse_args(["--demo", "--random-demo-model", "--features", "batched", *extra])
    assert "apply to --features trajectory only" in capsys.readouterr().err


def test_cuda_graph_options_are_refused_where_they_cannot_apply(tmp_path, capsys, cpu_only):
    recipe = _recipe()
    assert recipe.parse_args(["--demo"]).cuda_graph is None and recipe.parse_args(["--demo", "--no-cuda-graph"]).cuda_graph is False
    with pytest.raises(SystemExit):
        recipe.parse_args(["--demo", "--features", "batched", "--cuda-graph"])
    assert "apply to --features trajectory only" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--cuda-graph needs a CUDA device"):
        recipe.main(TINY + ["--cuda-graph", "--out", str(tmp_path)])


def _frozen_on_gpu():
    """(recipe, the tiny Frozen with a tiny SD VAE on the GPU, args, device); skips without a GPU."""
    from unet_seg.models import TINY_VAE, AutoencoderKL

    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a GPU")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    recipe, dev = _recipe(), torch.device("cuda")
    cpu, args = frozen_tiny(recipe)
    vae = AutoencoderKL(TINY_VAE).to(dev).eval().requires_grad_(False)
    frozen = recipe.Frozen(cpu.unet.to(dev), vae, cpu.contexts.to(dev), cpu.prompt_ids, cpu.schedule.to(dev), cpu.level_channels)
    torch.manual_seed(0)
    return recipe, frozen, args, dev


def test_graphed_training_steps_train_as_eager_steps_do():
    """The default on one GPU: the training step (VAE sample, 4-step trajectory, both branches'
    head, losses, AdamW) replayed as a CUDA graph follows the eager step from the first step on: the
    loss terms and every weight after each of 4 steps whose labels hold one or two prompted classes
    (3 or 4 prompt rows: two graphs). Runs where a GPU is (CI has none)."""
    import copy

    from unet_seg.train import CudaGraphStep

    recipe, frozen, args, dev = _frozen_on_gpu()
    eager = recipe.Segmenter(frozen.level_channels, 10, (32, 16, 8), 8, 8, 4, (1, 2, 2, 2)).to(dev).train()
    graphed = copy.deepcopy(eager)
    # eps 1: updates linear in the gradient. With a small eps Adam's first steps move a weight of near-zero gradient by
    # ±lr whatever the float noise of the backward's atomics decides: one weight in 24 576 then differed by 1e-5 (H100)
    opts = [torch.optim.AdamW([{"params": m.fusion.parameters(), "lr": torch.tensor(1e-3, device=dev)},
                               {"params": m.head.parameters(), "lr": torch.tensor(1e-2, device=dev)}],
                              weight_decay=0.01, eps=1.0, fused=True, capturable=True) for m in (eager, graphed)]  # fmt: skip
    steps = [lambda image, label, *rows, m=m, o=o: recipe.train_step(m, frozen, o, image, label, rows, True, args) for m, o in zip((eager, graphed), opts)]
    graph_step = CudaGraphStep(steps[1], [graphed], opts[1])
    image = torch.rand(1, 3, 64, 64, device=dev) * 2 - 1
    labels = [torch.zeros(1, 64, 64, dtype=torch.long) for _ in range(4)]
    for i, label in enumerate(labels):
        label[:, :32] = 5
        if i % 2:
            label[:, 48:] = 9
    inputs = ((image, label.to(dev), *recipe.branch_rows(frozen, label, True, dev)) for label in labels)
    assert_graph_follows_eager(steps[0], graph_step, eager, graphed, inputs)  # (loss, {term: value}) compared whole
    assert sorted(key[2][0][0] for key in graph_step.graphs) == [3, 4]  # row_image [R]: one graph per row count
    graph_step.close()


def test_graphed_evaluation_predicts_as_the_eager_one_does():
    """--cuda-graph on one GPU: each evaluation image size's VAE sample, trajectory and head replay as
    one CUDA graph (two sizes, two graphs), drawing from the seed as the eager prediction does: the
    same logits, image after image, and the global RNG left as it was. Runs where a GPU is."""
    from unet_seg.train import CudaGraphCall

    recipe, frozen, args, dev = _frozen_on_gpu()
    model = recipe.Segmenter(frozen.level_channels, 10, (32, 16, 8), 8, 8, 4, (1, 2, 2, 2)).to(dev).eval()
    graphs = CudaGraphCall(partial(recipe.unconditional_logits, model, frozen, args))
    images = [(torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(i)) * 2 - 1).to(dev) for i, size in enumerate([(64, 64), (72, 40)] * 2)]
    state = torch.cuda.get_rng_state()
    for image in images:
        eager = recipe.predict_logits(model, frozen, image, args)
        torch.testing.assert_close(recipe.predict_logits(model, frozen, image, args, graphs), eager, rtol=1e-5, atol=1e-5)
    assert len(graphs.graphs) == 2 and torch.equal(torch.cuda.get_rng_state(), state)
    graphs.close()


def test_two_gloo_processes_share_weights_draw_own_noise_resume_exactly_and_split_the_evaluation(tmp_path):
    run_two_gloo_processes("diff_gta2cs", TINY + ["--no-baseline"], tmp_path)



def test_real_data_path_runs_end_to_end_on_tiny_checkpoint_and_folders(tmp_path, cpu_only, capsys):
    """--model/--data-root: a tiny SD2-layout v-prediction checkpoint, GTA5 and Cityscapes folders
    written here; the official GTA5 pipeline with rare-class sampling (class counts cached next to
    the data), the trajectory, evaluation on Cityscapes; a sanity check first, which changes
    nothing: with --no-sanity-check the run ends with the same weights, optimiser state and mIoU."""
    import numpy as np
    from PIL import Image

    sd = write_tiny_sd(tmp_path / "sd", prediction_type="v_prediction")
    data, rng = tmp_path / "data", np.random.default_rng(0)

    def write(image_path, label_path, h, w, ids):
        for p in (image_path, label_path):
            p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image_path)
        Image.fromarray(ids.astype(np.uint8), mode="L").save(label_path)

    for stem in ("00001", "00002"):  # road (id 7) above, sidewalk (8: prompted) or wall (12: prompted) below
        ids = np.full((105, 191), 7)
        ids[50:] = 8 if stem == "00001" else 12
        write(data / "gta5" / "images" / f"{stem}.png", data / "gta5" / "labels" / f"{stem}.png", 105, 191, ids)
    stem = "frankfurt/frankfurt_000000_000294"
    write(data / "cityscapes" / "leftImg8bit" / "val" / f"{stem}_leftImg8bit.png",
          data / "cityscapes" / "gtFine" / "val" / f"{stem}_gtFine_labelIds.png", 64, 128, np.full((64, 128), 7))  # fmt: skip
    args = ["--model", str(sd), "--data-root", str(data), "--targets", "cityscapes", "--size", "64", "--steps", "2",
            "--trajectory", "7", "30", "91", "120", "--timesteps", "91", "7", "--out", str(tmp_path / "out")]  # fmt: skip
    metrics = _recipe().main(args)
    assert set(metrics) == {"DIFF + IPKL (L2)"} and set(metrics["DIFF + IPKL (L2)"]) == {"cityscapes"}
    counts = json.loads((data / "gta5" / "class_counts_train.json").read_text())
    assert counts["keys"] == ["labels/00001.png", "labels/00002.png"] and counts["counts"][0][1] == 55 * 191
    printed = capsys.readouterr().out
    assert printed.count("sanity check passed in") == 1 and "one item of cityscapes 1024x512); 2 steps ≈" in printed

    assert _recipe().main(args[:-1] + [str(tmp_path / "plain"), "--no-sanity-check"]) == metrics
    assert "sanity check" not in capsys.readouterr().out
    checked, plain = (load_file(str(checkpoint_path(tmp_path / d, 2))) for d in ("out", "plain"))
    assert checked.keys() == plain.keys() and all(torch.equal(checked[k], plain[k]) for k in checked)
    assert not (tmp_path / "out" / "sanity-check").exists()  # the check's own checkpoint is gone
