"""Rehearsals of the recipes' real runs (not `--demo`): each recipe runs as a user starts it, on
two gloo processes under torchrun, with `--model` a tiny random SD 2.x checkpoint folder in the hub
layout and the data roots fake datasets in the real on-disk layouts at the native image sizes
(`tests/fake_datasets.py`), evaluating every target of the official run (DiffewS: fold 0 of the
four), then `--resume`s from its step-1 checkpoint. Only model size and step counts differ from
the real settings (DIFF's 106M-parameter head and QueryDiff's decoder: `--small-head`; QueryDiff's
DINOv2-L: a 32-wide one in timm's hub layout; batch sizes where the fake sets are small). What they cannot rehearse: a
GPU, the real weights, the real data (its content and size), the length of a real run.

Each takes minutes of CPU (two processes, DataLoader workers, native-size images): marked `slow`
(they start first under `-n 2 --dist worksteal`) and `rehearsal` (`-m "not rehearsal"` skips them)."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from unet_seg.models import TINY_SD2
from unet_seg.train import checkpoint_path

from .fake_datasets import write_ade20k, write_bdd100k, write_cityscapes, write_coco20i, write_driving, write_gta5, write_mapillary
from .helpers import (
    assert_rank_shares_cover_each_item_once, assert_ranks_hold_the_same_weights, run_torchrun, write_tiny_clip, write_tiny_dinov2, write_tiny_sd,
)  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.rehearsal]

# TINY_SD2 narrowed to 32 channels and one ResNet per block: at native sizes (Cityscapes evaluated at
# 1024×512: a 128×64 latent) its full-resolution attention sees 8192 tokens.
REHEARSAL_UNET = replace(TINY_SD2, channels=(32, 32, 32, 32), heads=(1, 1, 1, 1), layers_per_block=1)
QUERYDIFF_UNET = replace(REHEARSAL_UNET, layers_per_block=2)  # QueryDiff taps all three ResNets of up blocks 1-3, as SD has them


def failure(run) -> str:
    """The first rank's traceback in a torchrun's stderr (torchrun's own summary comes after it)."""
    err = run.stderr
    start = err.find("Traceback")
    return err[start : start + 6000] if start >= 0 else err[-6000:]


def rehearse(recipe: str, args: list, tmp_path, run_dir: str = "", timeout: int = 900) -> dict:
    """`recipe` with `args` on 2 gloo ranks for 2 steps (checkpoints at both), then again from only
    its step-1 checkpoint with --resume. Asserts: both runs finish, the ranks hold the same weights
    at every checkpoint, every evaluation split covers each item once, the resumed step-2
    checkpoint equals the straight one bit for bit, and both write the same metrics -> metrics."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = run_torchrun(recipe, args + ["--out", str(straight)], probe=tmp_path / "probe", timeout=timeout)
    assert run.returncode == 0, failure(run)
    assert "on 2 process(es)" in run.stdout
    assert [line for line in run.stdout.splitlines() if "sanity check passed in" in line] == [sanity_line(run)]  # once, rank 0
    assert assert_ranks_hold_the_same_weights(tmp_path / "probe") == [1, 2]
    splits = assert_rank_shares_cover_each_item_once(tmp_path / "probe")
    (resumed / run_dir).mkdir(parents=True)  # an interrupted run: only its step-1 checkpoint exists
    shutil.copy(checkpoint_path(straight / run_dir, 1), resumed / run_dir)
    again = run_torchrun(recipe, args + ["--out", str(resumed), "--resume"], timeout=timeout)
    assert again.returncode == 0, failure(again)
    a, b = (load_file(str(checkpoint_path(d / run_dir, 2))) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b.get(k))][:5]
    metrics, again_metrics = (json.loads((d / "metrics.json").read_text()) for d in (straight, resumed))
    assert scores(again_metrics) == scores(metrics)
    return metrics, splits, run


def sanity_line(run) -> str:
    """The line the sanity check prints before training (one item of every evaluation set at its
    full size, a checkpoint written and read back)."""
    lines = [line for line in run.stdout.splitlines() if "sanity check passed in" in line]
    assert lines, "no sanity check line:\n" + run.stdout[-2000:]
    return lines[0]


def scores(metrics: dict) -> dict:
    """metrics.json without its timings (columns "images/s", "train s", ...)."""
    timed = lambda col: col.endswith("/s") or col.endswith(" s")  # noqa: E731
    return {row: {col: v for col, v in cols.items() if not timed(col)} for row, cols in metrics.items()}


DRIVING_TARGETS = ["cityscapes", "bdd100k", "mapillary", "acdc", "darkzurich"]
QUERYDIFF_TARGETS = ["cityscapes", "bdd100k", "mapillary"]


def test_diff_official_run_gta5_to_five_targets(tmp_path):
    """The official DIFF command: GTA5 (1914×1052) -> Cityscapes, BDD100K, Mapillary, ACDC, Dark
    Zurich at their native sizes, each evaluated whole at its LAYOUTS scale through the trajectory."""
    data, sd = write_driving(tmp_path / "data"), write_tiny_sd(tmp_path / "sd", "v_prediction", unet=REHEARSAL_UNET)
    args = ["--model", str(sd), "--data-root", str(data), "--source", "gta5", "--targets", *DRIVING_TARGETS,
            "--steps", "2", "--save-every", "1", "--trajectory", "7", "30", "--timesteps", "7", "0", "--small-head"]  # fmt: skip
    metrics, splits, run = rehearse("diff_gta2cs", args, tmp_path)
    assert all(target in sanity_line(run) for target in DRIVING_TARGETS), sanity_line(run)
    (scores,) = metrics.values()
    assert set(scores) == set(DRIVING_TARGETS) and all(0 <= v <= 100 for v in scores.values())
    assert splits >= len(DRIVING_TARGETS)


def test_diffews_coco20i_fold_run_with_one_and_five_shot_evaluation(tmp_path):
    """The README's DiffewS command (`--fold F --shots 1`) on COCO 2014 images of odd and portrait
    sizes (640×427, 427×640, 500×375, ...) squashed to 512², 1- and 5-shot evaluation episodes
    (4 training images: a batch of 2 episodes on each of the 2 ranks)."""
    data, sd = write_coco20i(tmp_path / "COCO2014", train_images=4), write_tiny_sd(tmp_path / "sd", "v_prediction", unet=REHEARSAL_UNET)
    args = ["--model", str(sd), "--data-root", str(data), "--fold", "0", "--shots", "1", "--steps", "2", "--save-every", "1",
            "--eval-items", "2"]  # fmt: skip
    metrics, splits, _ = rehearse("diffews_coco20i", args, tmp_path)
    assert {"DiffewS 1-shot", "DiffewS 5-shot"} <= set(metrics) and splits >= 2
    assert all(0 <= v <= 100 for row in metrics.values() for v in row.values())


def test_digseg_ade20k_run_with_clip_candidates(tmp_path):
    """The README's DiGSeg command with CLIP's candidate classes: ADE20K images of varied sizes
    (683×512, 512×683 portrait, 500×375, 256×341) squashed to 512², the default E×S = 8×2, a tiny
    full CLIP checkpoint folder (transformers' layout) for --clip, SD 2.x-base's ε objective."""
    data, sd = write_ade20k(tmp_path / "ADEChallengeData2016"), write_tiny_sd(tmp_path / "sd", "epsilon", unet=REHEARSAL_UNET)
    clip = write_tiny_clip(tmp_path / "clip", projection_dim=128)  # random towers: CLIP picks few of the 150 classes
    args = ["--model", str(sd), "--clip", str(clip), "--data-root", str(data), "--candidates", "clip", "--steps", "2",
            "--save-every", "1", "--eval-items", "2"]  # fmt: skip
    metrics, splits, _ = rehearse("digseg_ade20k", args, tmp_path)
    assert splits >= 1 and {"DiGSeg 8x2, argmax", "DiGSeg 8x2, τ 0.7"} <= set(metrics)
    assert all(0 <= row["mIoU"] <= 100 for row in metrics.values()) and metrics["DiGSeg 8x2, argmax"]["class runs/s"] > 0


def test_querydiff_gta5_to_cityscapes_bdd100k_mapillary(tmp_path):
    """The README's QueryDiff command: GTA5 (1914×1052) -> Cityscapes (2048×1024), BDD100K (1280×720),
    Mapillary (4032×3024 and 1920×1080, halved) slid over in 512² windows at stride 341, with the
    release's /14 -> /16 conversion of a DINOv2 checkpoint in timm's hub layout (ViT-L's 24 blocks
    and 37 × 37 position grid, 32 wide) and the DCL fed by a tiny SD 2.x U-Net's up-block ResNets."""
    data = tmp_path / "data"  # DIFF's layout, without ACDC and Dark Zurich
    write_gta5(data / "gta5"), write_cityscapes(data / "cityscapes"), write_bdd100k(data / "bdd100k"), write_mapillary(data / "mapillary")
    sd = write_tiny_sd(tmp_path / "sd", "epsilon", unet=QUERYDIFF_UNET)  # the release's "stable-diffusion-2" (ε)
    args = ["--model", str(sd), "--dinov2", str(write_tiny_dinov2(tmp_path / "dinov2")), "--data-root", str(data), "--targets", *QUERYDIFF_TARGETS,
            "--steps", "2", "--save-every", "1", "--batch-size", "1", "--small-head"]  # fmt: skip
    metrics, splits, run = rehearse("querydiff_gta2cs", args, tmp_path, run_dir="querydiff")
    stored = load_file(str(checkpoint_path(tmp_path / "straight" / "querydiff", 2)))  # the frozen DINOv2: a fingerprint, not stored
    assert not any(k.startswith("model/model/backbone.vit.") for k in stored) and any(k.startswith("model/model/backbone.reins.") for k in stored)
    assert all(f"{t} " in sanity_line(run) for t in QUERYDIFF_TARGETS), sanity_line(run)
    (scores,) = metrics.values()
    assert {k for k in scores if "mIoU" in k} == {f"{t} mIoU" for t in QUERYDIFF_TARGETS}
    assert all(0 <= v <= 100 for k, v in scores.items() if "mIoU" in k) and splits >= 3
