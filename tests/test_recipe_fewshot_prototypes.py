"""The prototype recipe end to end: it pre-trains its demo U-Net once, trains the head, evaluates
1-shot, 5-shot and the control, writes metrics and the episode grid, resumes exactly (the
checkpoint holds the pre-trained U-Net: a resumed run does not pre-train again) and runs under 2
gloo processes."""

import json

from unet_seg.train import checkpoint_path

from .helpers import assert_resume_is_exact, load_recipe, run_two_gloo_processes

TINY = ["--demo", "--size", "64", "--steps", "2", "--batch-size", "2", "--eval-items", "4", "--save-every", "1", "--pretrain-steps", "1", "--random-demo-model"]
CONTROL = "control: 1-shot, supports of the query's other class"


def _recipe():
    return load_recipe("fewshot_prototypes_coco20i")


def test_demo_writes_metrics_and_episode_grid(tmp_path, capsys):
    metrics = _recipe().main(TINY + ["--shots", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("DEMO:") and "pre-trained the tiny U-Net for 1 denoising steps" in out
    assert set(metrics) == {"prototypes 1-shot", "prototypes 5-shot", CONTROL}
    table = json.loads((tmp_path / "metrics.json").read_text())
    assert set(table) == set(metrics) and all(0 <= r["mIoU"] <= 100 and 0 <= r["FB-IoU"] <= 100 for r in table.values())
    assert (tmp_path / "episodes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.glob("step_*.safetensors")] == [checkpoint_path(tmp_path, 2).name]  # a finished demo keeps its last


def test_resume_continues_to_the_same_weights_without_pre_training_again(tmp_path, cpu_only, capsys):
    weights = assert_resume_is_exact(_recipe().main, TINY, tmp_path)
    assert any(k.startswith("model/unet/") for k in weights) and any(k.startswith("model/head/") for k in weights)
    assert capsys.readouterr().out.count("pre-trained the tiny U-Net") == 1  # the straight run only


def test_two_gloo_processes_share_weights_draw_own_noise_resume_exactly_and_split_the_evaluation(tmp_path):
    run_two_gloo_processes("fewshot_prototypes_coco20i", TINY, tmp_path, grid="episodes.png", timeout=300)


def test_real_data_defaults_and_usage_errors(tmp_path, capsys):
    import pytest

    args = _recipe().parse_args(["--model", "m", "--data-root", str(tmp_path)])
    assert (args.steps, args.size, args.dim, args.eval_items, args.pretrain_steps) == (20000, 512, 256, 1000, 0)
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--demo", "--fold", "4"])
    assert "invalid choice: 4" in capsys.readouterr().err
    for flags in (["--predict", "x.png", "--from", str(tmp_path)], ["--export"]):  # nothing to export: not offered
        with pytest.raises(SystemExit):
            _recipe().parse_args(flags)
        assert f"unrecognized arguments: {flags[0]}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "--fold" in help_text and not any(f in help_text for f in ("--predict", "--from", "--export", "use a trained model"))


def test_real_data_path_runs_end_to_end_on_a_tiny_checkpoint_and_coco20i_folders(tmp_path, cpu_only):
    """--model/--data-root: a tiny SD 2-layout checkpoint (a real AutoencoderKL) and a COCO-20i
    folder in HSNet's layout, every class in each of 8 images (5-shot episodes need 6)."""
    import numpy as np

    from .helpers import write_tiny_sd
    from .test_coco20i import write_sample

    sd = write_tiny_sd(tmp_path / "sd", prediction_type="epsilon")
    raw = np.zeros((40, 32), np.uint8)
    for c in range(80):  # class c: a 4x4 block, value c + 1
        raw[4 * (c // 8) : 4 * (c // 8) + 4, 4 * (c % 8) : 4 * (c % 8) + 4] = c + 1
    for split in ("train2014", "val2014"):
        for j in range(8):
            write_sample(tmp_path / "coco", split, f"COCO_{split}_{j:012d}", raw, (20 * j, 200 - 20 * j, 90))
    out = tmp_path / "run"
    metrics = _recipe().main(["--model", str(sd), "--data-root", str(tmp_path / "coco"), "--size", "64", "--steps", "2",
                              "--batch-size", "2", "--eval-items", "4", "--dim", "32", "--out", str(out)])  # fmt: skip
    assert set(metrics) == {"prototypes 1-shot", "prototypes 5-shot"}  # no control on real data
    assert all(0 <= r["mIoU"] <= 100 for r in metrics.values()) and (out / "episodes.png").is_file()
    from safetensors.torch import load_file

    assert not any(k.startswith("model/unet/") for k in load_file(str(checkpoint_path(out, 2))))  # SD is not saved
