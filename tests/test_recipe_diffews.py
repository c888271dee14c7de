"""The DiffewS recipe end to end: it trains, evaluates, writes metrics and the episode grid,
resumes from its checkpoint, runs under 2 gloo processes, and (a shortened demo, ~2 minutes on
2 cores) learns to beat both trivial baselines on held-out classes."""

import json

import pytest

from unet_seg.train import checkpoint_path

from .helpers import load_recipe, run_torchrun, straight_and_resumed

TINY = ["--demo", "--steps", "2", "--batch-size", "2", "--episodes", "4", "--save-every", "1"]


def _recipe():
    return load_recipe("diffews_coco20i")


def test_demo_writes_metrics_and_episode_grid(tmp_path, capsys):
    metrics = _recipe().main(TINY + ["--shots", "2", "--eval-every", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("DEMO:")
    assert "step 1: 1-shot mIoU" in out and "step 2: 1-shot" not in out  # periodic, and not twice at the end
    expected = {"DiffewS 1-shot", "DiffewS 5-shot", "baseline: support mask", "baseline: all foreground",
                "control: DiffewS 1-shot, supports of another class"}
    assert set(metrics) == expected
    table = json.loads((tmp_path / "metrics.json").read_text())
    assert set(table) == expected
    for row in table.values():
        assert 0 <= row["mIoU"] <= 100 and 0 <= row["FB-IoU"] <= 100
    assert "| DiffewS 1-shot |" in (tmp_path / "metrics.md").read_text()
    assert (tmp_path / "episodes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in sorted(tmp_path.glob("step_*.safetensors"))] == [checkpoint_path(tmp_path, s).name for s in (1, 2)]


def test_resume_continues_to_the_same_weights(tmp_path, cpu_only):
    import torch

    tiny = TINY + ["--shots", "3"]  # draws a shot count and supports from the global RNG each step
    evaluating = ["--eval-every", "1", "--eval-episodes", "2"]  # periodic evaluation must not perturb the run
    a, b = straight_and_resumed(_recipe().main, tiny, tmp_path, straight_only=evaluating)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_shortened_demo_beats_both_baselines_on_held_out_classes(tmp_path):
    metrics = _recipe().main(["--demo", "--steps", "150", "--episodes", "40", "--out", str(tmp_path)])
    ours = metrics["DiffewS 1-shot"]
    baselines = [metrics["baseline: support mask"], metrics["baseline: all foreground"]]
    assert ours["mIoU"] > 2 * max(b["mIoU"] for b in baselines), metrics
    assert ours["FB-IoU"] > max(b["FB-IoU"] for b in baselines), metrics


def test_bad_size_is_refused_with_a_clear_message(capsys):
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--demo", "--size", "72"])
    assert "multiple of 64" in capsys.readouterr().err


def test_two_gloo_processes_finish(tmp_path):
    run = run_torchrun("diffews_coco20i", TINY + ["--out", str(tmp_path)], timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sum(line.startswith("DEMO:") for line in run.stdout.splitlines()) == 1  # printed by rank 0 only
    assert "on 2 process(es)" in run.stdout
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "episodes.png").is_file()



def test_control_pairs_each_query_with_supports_of_another_class():
    import torch

    from unet_seg.data.synthetic import FewShotEpisodes, fold_split

    episodes = FewShotEpisodes(0, 6, fold_split(0)[1], shots=2, size=32)
    control = _recipe().SupportsOfNextEpisode(episodes)
    for i in range(len(episodes)):
        mine, next_one, mixed = episodes[i], episodes[i + 1 if i + 1 < len(episodes) else i - 1], control[i]
        assert next_one.class_id != mine.class_id and mixed.class_id == mine.class_id
        assert torch.equal(mixed.query, mine.query) and torch.equal(mixed.query_mask, mine.query_mask)
        assert torch.equal(mixed.supports, next_one.supports) and torch.equal(mixed.support_masks, next_one.support_masks)
