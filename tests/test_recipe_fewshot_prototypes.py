"""The prototype recipe end to end: it pre-trains its demo U-Net once, trains the head, evaluates
1-shot, 5-shot and the control, writes metrics and the episode grid, resumes exactly (the
checkpoint holds the pre-trained U-Net: a resumed run does not pre-train again) and runs under 2
gloo processes."""

import json

from unet_seg.train import checkpoint_path

from .helpers import assert_resume_is_exact, load_recipe, run_two_gloo_processes

TINY = ["--demo", "--steps", "2", "--batch-size", "2", "--episodes", "4", "--save-every", "1", "--pretrain-steps", "1"]
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
    assert [p.name for p in sorted(tmp_path.glob("step_*.safetensors"))] == [checkpoint_path(tmp_path, s).name for s in (1, 2)]


def test_resume_continues_to_the_same_weights_without_pre_training_again(tmp_path, cpu_only, capsys):
    weights = assert_resume_is_exact(_recipe().main, TINY, tmp_path)
    assert any(k.startswith("model/unet/") for k in weights) and any(k.startswith("model/head/") for k in weights)
    assert capsys.readouterr().out.count("pre-trained the tiny U-Net") == 1  # the straight run only


def test_two_gloo_processes_hold_identical_weights_and_split_the_evaluation_exactly(tmp_path):
    run_two_gloo_processes("fewshot_prototypes_coco20i", TINY, tmp_path, grid="episodes.png", timeout=300)


def test_real_data_defaults_and_usage_errors(tmp_path, capsys):
    import pytest

    args = _recipe().parse_args(["--model", "m", "--data-root", str(tmp_path)])
    assert (args.steps, args.size, args.dim, args.episodes, args.pretrain_steps) == (20000, 512, 256, 1000, 0)
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--demo", "--fold", "4"])
    assert "invalid choice: 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the shared parser offers them; this recipe has nothing to export
        _recipe().parse_args(["--predict", "x.png", "--from", str(tmp_path)])
    assert "not available in this recipe" in capsys.readouterr().err
