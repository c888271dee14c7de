"""The DIFF recipe end to end: it trains both branches, evaluates the unconditional one on both
styles, writes metrics and the prediction grid, resumes exactly, runs under 2 gloo processes,
and builds the conditional branch from the class prompts inside their masks only. The demo's
numbers are in the README (it does not show the paper's gain in miniature; no test claims it)."""

import json

import pytest
import torch

from unet_seg.train import checkpoint_path

from .helpers import load_recipe, run_torchrun, straight_and_resumed

TINY = ["--demo", "--steps", "2", "--pretrain-steps", "2", "--batch-size", "2", "--eval-images", "4", "--save-every", "1"]


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
    names = sorted(p.name for p in tmp_path.rglob("step_*.safetensors"))
    assert checkpoint_path(tmp_path, 2).name in names


def test_resume_continues_to_the_same_weights(tmp_path, cpu_only):
    a, b = straight_and_resumed(_recipe().main, TINY + ["--no-baseline"], tmp_path)
    assert a.keys() == b.keys() and any(k.startswith("model/segmenter/") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_conditional_features_fuse_the_class_prompts_inside_their_masks_only():
    recipe = _recipe()
    from unet_seg.diffusion import NoiseSchedule
    from unet_seg.models import TINY_SD2, UNet

    torch.manual_seed(0)
    unet = UNet(TINY_SD2).eval()
    contexts = torch.randn(3, 77, TINY_SD2.context_dim)
    z0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 2, 4, 8, 8)
    label = torch.zeros(2, 64, 64, dtype=torch.long)
    label[0, :32] = 5  # image 0: class 5 (prompted) in its top half; image 1: no prompted class
    schedule = NoiseSchedule.sd()
    with torch.no_grad():
        uncond, cond = recipe.branch_features(unet, z0, label, contexts, [5, 9], (50, 10), schedule, noise, True)
        plain, none = recipe.branch_features(unet, z0, label, contexts, [5, 9], (50, 10), schedule, noise, False)
    assert none is None
    for u, c, p in zip(uncond, cond, plain):
        torch.testing.assert_close(u, p)  # the unconditional branch ignores the labels
        h = u.shape[-2]
        torch.testing.assert_close(c[1], u[1])  # no prompted class: both branches agree
        torch.testing.assert_close(c[0, :, h // 2 :], u[0, :, h // 2 :])  # outside the mask too
        assert not torch.allclose(c[0, :, : h // 2], u[0, :, : h // 2])  # inside: the prompt's features


def test_poly_schedule_warms_up_then_decays_to_zero():
    f = _recipe().poly_with_warmup(100, 10)
    assert f(0) == pytest.approx(1e-6) and f(5) == pytest.approx(0.5 * 0.95, rel=1e-4)
    assert f(10) == pytest.approx(0.9) and f(100) == 0.0


def test_bad_size_is_refused_with_a_clear_message(capsys):
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--demo", "--size", "72"])
    assert "multiple of 64" in capsys.readouterr().err


def test_two_gloo_processes_finish(tmp_path):
    run = run_torchrun("diff_gta2cs", TINY + ["--no-baseline", "--out", str(tmp_path)], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sum(line.startswith("DEMO:") for line in run.stdout.splitlines()) == 1  # printed by rank 0 only
    assert "on 2 process(es)" in run.stdout
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "predictions.png").is_file()

