"""The recipes' command line (unet_seg.cli): presets, the demo by default, usage errors before
`import torch`, one-line errors for data layouts and checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from unet_seg.cli import parse_recipe_args, recipe_parser

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["diffews_coco20i", "diff_gta2cs", "querydiff_gta2cs", "digseg_ade20k", "fewshot_prototypes_coco20i"]
DEMO = dict(steps=300, batch_size=2, lr=1e-3, size=64, eval_items=20, extra="d")
REAL = dict(steps=9, batch_size=1, lr=1e-5, size=512, eval_items=0, extra="r")


def parser(all_items=True):
    p = recipe_parser("test", DEMO, REAL, out="runs/x", eval_items="test images", all_items=all_items)
    p.add_argument("--data-root")
    return p


def parse(argv):
    return parse_recipe_args(parser(), argv, DEMO, REAL, data=["--data-root"], dataset="TestSet")


def test_recipe_args_take_the_preset_of_the_mode_unless_given(tmp_path):
    args = parse(["--demo", "--lr", "0.5"])
    assert (args.steps, args.batch_size, args.lr, args.size, args.extra, args.demo_reason) == (300, 2, 0.5, 64, "d", None)
    args = parse(["--model", "m", "--data-root", str(tmp_path)])
    assert (args.steps, args.batch_size, args.lr, args.size, args.extra, args.out) == (9, 1, 1e-5, 512, "r", Path("runs/x"))
    assert args.model == "m" and not args.demo and args.save_every == 1000


def test_no_data_root_and_no_model_runs_the_demo_and_says_so_first(capsys, tmp_path):
    from unet_seg.cli import DEFAULT_MODEL
    from unet_seg.train import print_demo

    args = parse([])
    assert args.demo and args.steps == 300 and args.model == DEFAULT_MODEL
    print_demo(args, "tiny things")
    assert capsys.readouterr().out.splitlines() == [
        "no --data-root: running the synthetic demo; see --help for TestSet", "DEMO: tiny things"
    ]
    print_demo(parse(["--demo"]), "tiny things")
    print_demo(parse(["--model", "m", "--data-root", str(tmp_path)]), "not printed")
    assert capsys.readouterr().out == "DEMO: tiny things\n"


def test_demo_checkpoints_within_the_run_so_an_interrupted_demo_can_resume():
    assert parse([]).save_every == 100 and parse(["--demo", "--steps", "2"]).save_every == 1
    assert parse(["--demo", "--save-every", "7"]).save_every == 7


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--demo", "--size", "68"], "--size must be a positive multiple of 8 (the VAE's downscale)"),
        (["--demo", "--size", "0"], "--size must be a positive multiple of 8"),
        (["--demo", "--steps", "-1"], "error: --steps must be >= 1, got -1\n"),
        (["--demo", "--steps", "0"], "error: --steps must be >= 1, got 0\n"),
        (["--demo", "--batch-size", "0"], "error: --batch-size must be >= 1, got 0\n"),
        (["--demo", "--save-every", "-3"], "error: --save-every must be >= 1, got -3\n"),
        (["--model", "m"], "--data-root is required with --model"),
        (["--data-root", "/no/such/root"], "--data-root /no/such/root: no such folder"),
    ],
)
def test_recipe_args_refuse_bad_shared_options(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("old", ["--episodes", "--images", "--eval-images", "--eval-every", "--eval-episodes", "--gta-root",
                                 "--cityscapes-root", "--bdd-root", "--mapillary-root"])  # fmt: skip
def test_renamed_options_are_refused_with_one_line_naming_the_new_one(old, capsys):
    from unet_seg.cli import RENAMED

    with pytest.raises(SystemExit) as e:
        parse(["--demo", f"{old}=3"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and last == f"{parser().prog}: error: {old} was renamed: use {RENAMED[old]}"
    assert RENAMED[old].split()[0] in {"--eval-items", "--val-every", "--val-items", "--data-root"}


def test_eval_items_take_the_preset_and_zero_means_all_only_of_a_real_test_set(tmp_path, capsys):
    real = ["--model", "m", "--data-root", str(tmp_path)]
    assert (parse(["--demo"]).eval_items, parse(real).eval_items, parse(real + ["--eval-items", "5"]).eval_items) == (20, 0, 5)
    for argv, p, message in [
        (["--demo", "--eval-items", "0"], parser(), "--eval-items must be >= 1 (0 = all is for real test sets), got 0"),
        (real + ["--eval-items", "-1"], parser(), "--eval-items must be >= 0, got -1"),
        (real + ["--eval-items", "0"], parser(all_items=False), "--eval-items must be >= 1 (test episodes are drawn: give a count)"),
    ]:
        with pytest.raises(SystemExit):
            parse_recipe_args(p, argv, DEMO, REAL, data=["--data-root"])
        assert message in capsys.readouterr().err


def test_workers_default_to_zero_in_the_demo_and_four_in_a_real_run(tmp_path):
    real = ["--model", "m", "--data-root", str(tmp_path)]
    assert (parse(["--demo"]).workers, parse(real).workers, parse(real + ["--workers", "2"]).workers) == (0, 4, 2)


def test_validation_options_are_checked(capsys):
    from unet_seg.cli import add_validation

    p = parser()
    add_validation(p, "test images", 7)
    args = parse_recipe_args(p, ["--demo", "--val-every", "5"], DEMO, REAL)
    assert (args.val_every, args.val_items) == (5, 7)
    for argv, message in [(["--val-every", "-1"], "--val-every must be >= 0 (0: off), got -1"),
                          (["--val-every", "2", "--val-items", "0"], "--val-items must be >= 1, got 0")]:  # fmt: skip
        with pytest.raises(SystemExit):
            parse_recipe_args(p, ["--demo"] + argv, DEMO, REAL)
        assert message in capsys.readouterr().err


def test_import_unet_seg_and_its_cli_do_not_import_torch():
    code = "import sys, unet_seg, unet_seg.cli; from unet_seg import CheckpointError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
    code = "import sys, unet_seg; unet_seg.load_sd; print('torch' in sys.modules)"  # lazy attribute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "True"


# Runs a recipe as `python recipes/x.py ARGS` would, then reports whether torch was imported.
RUN_AS_MAIN = """
import json, runpy, sys
sys.argv = [sys.argv[1], *json.loads(sys.argv[2])]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize("name", RECIPES)
def test_usage_errors_come_before_importing_torch(name):
    argv = ["--demo", "--size", "68"]
    path = ROOT / "recipes" / f"{name}.py"
    run = subprocess.run([sys.executable, "-c", RUN_AS_MAIN, str(path), json.dumps(argv)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2
    assert "--size must be a positive multiple of" in run.stderr and "torch imported: False" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("name, old, new", [
    ("diffews_coco20i", "--eval-episodes", "--val-items"), ("diff_gta2cs", "--eval-images", "--eval-items"),
    ("querydiff_gta2cs", "--gta-root", "--data-root"), ("digseg_ade20k", "--images", "--eval-items"),
    ("fewshot_prototypes_coco20i", "--episodes", "--eval-items"),
])  # fmt: skip
def test_each_recipe_refuses_its_former_option_names_before_importing_torch(name, old, new):
    path = ROOT / "recipes" / f"{name}.py"
    run = subprocess.run([sys.executable, "-c", RUN_AS_MAIN, str(path), json.dumps([old, "3"])], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and f"error: {old} was renamed: use {new} (" in run.stderr
    assert "torch imported: False" in run.stderr


def test_fold_out_of_range_is_a_usage_error():
    path = ROOT / "recipes" / "diffews_coco20i.py"
    argv = ["--fold", "7"]
    run = subprocess.run([sys.executable, "-c", RUN_AS_MAIN, str(path), json.dumps(argv)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "argument --fold: invalid choice: 7" in run.stderr
    assert "torch imported: False" in run.stderr


def test_a_data_root_in_the_wrong_layout_is_one_line_not_a_traceback(tmp_path):
    path = ROOT / "recipes" / "diffews_coco20i.py"
    run = subprocess.run(
        [sys.executable, str(path), "--model", "m", "--data-root", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line.startswith(f"diffews_coco20i.py: error: {tmp_path}/annotations/train2014 is not a directory")
    assert "expected the COCO-20i layout" in line


def test_run_reports_an_interrupted_training_in_one_line_with_status_130(capsys):
    from unet_seg.cli import run
    from unet_seg.errors import TrainingInterrupted

    def main():
        raise TrainingInterrupted(57, "runs/x/step_000000057.safetensors", "SIGTERM")

    with pytest.raises(SystemExit) as e:
        run(main)
    assert e.value.code == 130
    assert capsys.readouterr().err == (
        "SIGTERM: interrupted at step 57; wrote runs/x/step_000000057.safetensors; rerun with --resume to continue\n"
    )


@pytest.mark.parametrize("world, rank", [(None, None), ("2", "1")])
def test_run_reports_a_non_finite_loss_in_one_line_naming_the_rank(world, rank, monkeypatch):
    import torch

    from unet_seg.cli import NON_FINITE_ADVICE, run
    from unet_seg.losses import check_finite

    for name, value in (("WORLD_SIZE", world), ("RANK", rank)):
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)

    def main():
        check_finite(torch.tensor([0.5, float("nan")]), "CE + Dice")

    with pytest.raises(SystemExit) as e:
        run(main, prog="recipe.py")
    where = "rank 1: " if rank else ""
    assert e.value.code == f"recipe.py: error: {where}CE + Dice is not finite: [0.5, nan]; {NON_FINITE_ADVICE}"
    assert "\n" not in e.value.code


def test_an_error_raised_in_a_dataloader_worker_is_still_one_line():
    """torch re-raises a worker's error with the worker's traceback in its message."""
    code = (
        "import torch\nfrom unet_seg.cli import run\nfrom unet_seg.errors import InputError\n"
        "class Bad(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n        return 2\n"
        "    def __getitem__(self, i):\n        raise InputError('a.png is (3, 4) but its label is (3, 5)')\n"
        "run(lambda: next(iter(torch.utils.data.DataLoader(Bad(), num_workers=1))), prog='recipe.py')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and out.stderr == "recipe.py: error: a.png is (3, 4) but its label is (3, 5)\n"


def screen(text: str) -> list[str]:
    """What a terminal shows after `text`: a carriage return writes over its line from the left."""
    lines, col = [[]], 0
    for ch in text:
        if ch == "\n":
            lines, col = lines + [[]], 0
        elif ch == "\r":
            col = 0
        else:
            lines[-1][col : col + 1] = [ch]
            col += 1
    return ["".join(line).rstrip() for line in lines if "".join(line).strip()]


def test_the_interrupt_lines_go_above_the_progress_bar_not_into_it(capsys):
    import signal

    from tqdm import tqdm

    from unet_seg.cli import run
    from unet_seg.errors import TrainingInterrupted
    from unet_seg.train import loop

    def main():
        bar = tqdm(total=10, desc="train", file=sys.stderr, mininterval=0)
        bar.update(3)
        loop._on_signal(signal.SIGINT, None)  # Ctrl-C during step 4
        bar.update(1)
        raise TrainingInterrupted(4, "runs/x/step_000000004.safetensors", "SIGINT")

    try:
        with pytest.raises(SystemExit):
            run(main)
    finally:
        loop._INTERRUPT.requested = False
    shown = screen(capsys.readouterr().err)
    assert shown[:2] == [
        "SIGINT: finishing this step, then writing a checkpoint (again to stop at once)",
        "SIGINT: interrupted at step 4; wrote runs/x/step_000000004.safetensors; rerun with --resume to continue",
    ]
    assert [line for line in shown[2:] if not line.startswith("train:")] == []


def test_run_prints_warnings_in_one_line_without_their_source():
    code = (
        "import warnings; from unet_seg.cli import run\n"
        "def main():\n    warnings.warn('RNG states not restored')\n"
        "run(main, prog='recipe.py'); warnings.warn('after the run')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stderr.splitlines()[0] == "recipe.py: warning: RNG states not restored"
    assert out.stderr.splitlines()[1:] == ["<string>:4: UserWarning: after the run"]  # the formatter was put back



def test_run_ends_a_gloo_process_with_its_status_and_without_interpreter_teardown(monkeypatch, capsys):
    """Under a gloo group a recipe's process leaves through os._exit with the status `run` would
    have exited with (a message on stderr is status 1, a traceback too), after leaving the group."""
    from unet_seg.cli import run
    from unet_seg.errors import InputError
    from unet_seg.train import distributed

    exits, left = [], []
    monkeypatch.setattr(distributed, "_joined_gloo", True)
    monkeypatch.setattr(distributed, "cleanup_distributed", lambda: left.append(True))
    monkeypatch.setattr(distributed.os, "_exit", exits.append)  # returns here: run goes on as without it

    def fails(error):
        def main():
            raise error

        return main

    run(lambda: None, prog="x.py")
    with pytest.raises(SystemExit):
        run(fails(InputError("no such folder")), prog="x.py")
    with pytest.raises(RuntimeError):
        run(fails(RuntimeError("boom")), prog="x.py")
    assert exits == [0, 1, 1] and len(left) == 3
    err = capsys.readouterr().err
    assert "x.py: error: no such folder" in err and "Traceback" in err and "RuntimeError: boom" in err
    monkeypatch.setattr(distributed, "_joined_gloo", False)  # no group: run returns, os._exit untouched
    run(lambda: None, prog="x.py")
    assert exits == [0, 1, 1]
