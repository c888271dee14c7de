"""The recipes' command line, without torch: usage errors come before the heavy imports.

Importing torch takes seconds (13-20 s on a cold machine), so a recipe parses its command line
first and imports the rest after:

    from unet_seg.cli import parse_recipe_args, recipe_parser, run     # no torch

    def parse_args(argv=None):
        p = recipe_parser(__doc__, DEMO, REAL, out="runs/x")
        p.add_argument("--data-root", help="...")
        return parse_recipe_args(p, argv, DEMO, REAL, data=["--data-root"], dataset="COCO-20i")

    if __name__ == "__main__":
        parse_args()      # a usage error exits here, in well under a second

    import torch          # noqa: E402 -- the recipe's heavy imports
    ...
    if __name__ == "__main__":
        run(main)         # a missing dataset layout or unusable checkpoint: one line, no traceback

Given neither a data root nor --model, a recipe runs its demo on synthetic data and says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import CheckpointError, DataLayoutError, InputError, SanityCheckFailed, TrainingInterrupted

NON_FINITE_ADVICE = (
    "training stopped before that step's update; the checkpoints written so far are kept "
    "(try a lower --lr in a new --out, or check that batch's files)"
)
DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1"

# Options that were renamed: the old name is refused with the new one and what it means.
RENAMED = {
    "--episodes": "--eval-items (test episodes per shot setting)",
    "--images": "--eval-items (test images; 0 = all)",
    "--eval-images": "--eval-items (test images per target; 0 = all) or, during training, --val-items",
    "--eval-every": "--val-every (evaluate every N training steps; 0 = off)",
    "--eval-episodes": "--val-items (test episodes of the evaluation during training)",
    "--gta-root": "--data-root (the folder holding gta5/, cityscapes/, bdd100k/, mapillary/)",
    "--cityscapes-root": "--data-root with cityscapes/ in it, and --targets",
    "--bdd-root": "--data-root with bdd100k/ in it, and --targets",
    "--mapillary-root": "--data-root with mapillary/ in it, and --targets",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is None (filled in from the presets) or a flag's False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        hidden = action.default is None or action.default is False
        return action.help if hidden else super()._get_help_string(action)


def recipe_parser(
    description: str,
    demo: dict,
    real: dict,
    out: str,
    eval_items: str,
    size_multiple: tuple[int, str] = (8, "the VAE's downscale"),
    all_items: bool = True,
    predict: bool = True,
) -> argparse.ArgumentParser:
    """A parser with the options every recipe shares. --steps, --batch-size, --lr, --size and
    --eval-items left unset take `real`'s value, or `demo`'s with --demo (`parse_recipe_args`
    fills them in, and any other key of those dicts too: `real["model"]` replaces DEFAULT_MODEL).
    Recipes add their own options to it. `eval_items`: what --eval-items counts ("test images per
    target"); `all_items`: whether 0 means all of a real test set (not for drawn episodes).
    `size_multiple`: (n, why) --size must be a multiple of n (the U-Net takes any latent size, so
    8 for SD; a backbone with coarser strides asks for more). `predict=False` leaves out the "use
    a trained model" options (--predict, --from, --export) for a recipe that exports nothing;
    `p.predict_group` is None then."""
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    p.add_argument(
        "--demo", action="store_true",
        help="tiny random models, synthetic data, CPU minutes, no download (the default when neither a data root "
        "nor --model is given)",
    )  # fmt: skip
    p.add_argument("--model", help=f"SD 2.x hub id or local folder (default {real.get('model', DEFAULT_MODEL)})")
    for flag, kind, what in (
        ("--steps", int, "training steps"),
        ("--batch-size", int, "training samples (images or episodes) per process and step"),
        ("--lr", float, "learning rate (see the recipe's hyper-parameter table)"),
        ("--size", int, f"training image side, a multiple of {size_multiple[0]}"),
    ):
        key = flag[2:].replace("-", "_")
        p.add_argument(flag, type=kind, help=f"{what} (default {real[key]}; demo {demo[key]})")
    n = real["eval_items"]
    every = ": all" if n == 0 else "; 0: all" if all_items else ""
    p.add_argument("--eval-items", type=int, help=f"{eval_items} evaluated at the end (default {n}{every}; demo {demo['eval_items']})")
    p.add_argument("--workers", type=int, help="DataLoader worker processes per training process (default 4; demo 0)")
    p.add_argument(
        "--save-every", type=int,
        help="checkpoint every N steps and at the end (default 1000; demo: a third of --steps, so an interrupted "
        "demo can resume)",
    )  # fmt: skip
    p.add_argument("--out", default=out, help="checkpoints, metrics.{md,json} and the predictions PNG")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--compile", action="store_true", help="torch.compile what runs every step")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, initialisation and noise")
    p.add_argument(
        "--random-demo-model", action="store_true",
        help="with --demo: a tiny random-weight SD (pre-trained in the run where the recipe needs a denoiser) instead "
        "of the tiny SD pre-trained on captioned synthetic scenes that ships with the package",
    )  # fmt: skip
    p.add_argument(
        "--no-sanity-check", action="store_true",
        help="skip the check a run makes first (two training steps, a checkpoint written and read back, one "
        "image of every evaluation set at full size, the projected duration; a demo's time estimate; the run's result "
        "is the same with it)",
    )  # fmt: skip
    p.predict_group, p.size_multiple, p.all_items = None, size_multiple, all_items
    if not predict:
        return p
    g = p.add_argument_group("use a trained model")
    g.add_argument("--predict", nargs="+", metavar="IMAGE_OR_FOLDER", help="segment these images (a folder: every "
                   "image in it) with the model exported to --from; writes <name>.png and <name>_overlay.png to --out "
                   "(default RUN/predictions)")  # fmt: skip
    g.add_argument("--from", dest="run", metavar="RUN", help="the training run's --out folder (or its model/ folder)")
    g.add_argument("--export", nargs="?", const="latest", metavar="CHECKPOINT", help="with the training run's flags: "
                   "write --out/model from its latest checkpoint (or CHECKPOINT) and exit; training does so at its end")  # fmt: skip
    p.predict_group = g  # a recipe's own prediction flags go here (DiffewS --support, DiGSeg --classes)
    return p


def add_validation(p: argparse.ArgumentParser, items: str, default: int) -> None:
    """--val-every N and --val-items M: a quick evaluation on M of `items` every N training steps."""
    p.add_argument("--val-every", type=int, default=0, help=f"evaluate on --val-items {items} every N training steps (0: off)")
    p.add_argument("--val-items", type=int, default=default, help=f"{items} of the evaluation during training")


def parse_recipe_args(
    p: argparse.ArgumentParser,
    argv: Optional[Sequence[str]],
    demo: dict,
    real: dict,
    data: Sequence[str] = ("--data-root",),
    dataset: str = "the real data",
) -> argparse.Namespace:
    """Parse `argv`, fill what was left unset from `demo` or `real`, check the shared options and
    the data roots (usage errors exit here) and make --out a Path.

    `data`: the recipe's data-root flags, the first one required for a real run. With none of
    them and no --model, the run is the demo: `args.demo` is set and `args.demo_reason` says why
    (None when --demo was given); `unet_seg.train.print_demo` prints it.
    """
    _refuse_renamed(p, sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if getattr(args, "predict", None) is not None or getattr(args, "run", None) is not None:
        return _predict_args(p, args)
    given = [flag for flag in data if getattr(args, _dest(flag)) is not None]
    args.demo_reason = None
    if not args.demo and not given and args.model is None:
        args.demo = True
        args.demo_reason = f"no {data[0]}: running the synthetic demo; see --help for {dataset}"
    args.demo_steps = demo["steps"]  # a demo far shorter says so at its end (unet_seg.train.finish_run)
    for key, value in (demo if args.demo else real).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not args.demo and not given:
        p.error(f"{data[0]} is required with --model (without both, the recipe runs its synthetic demo)")
    if not args.demo:
        for flag in given:
            if not Path(getattr(args, _dest(flag))).is_dir():
                p.error(f"{flag} {getattr(args, _dest(flag))}: no such folder")
    args.model = args.model or DEFAULT_MODEL
    if args.save_every is None:
        args.save_every = max(1, args.steps // 3) if args.demo else 1000
    n, why = p.size_multiple
    if args.size < n or args.size % n:
        p.error(f"--size must be a positive multiple of {n} ({why}), got {args.size}")
    for flag in ("--steps", "--batch-size", "--save-every"):
        if getattr(args, _dest(flag)) < 1:
            p.error(f"{flag} must be >= 1, got {getattr(args, _dest(flag))}")
    lowest = 0 if p.all_items and not args.demo else 1
    if args.eval_items < lowest:
        why = "" if lowest == 0 else " (0 = all is for real test sets)" if p.all_items else " (test episodes are drawn: give a count)"
        p.error(f"--eval-items must be >= {lowest}{why}, got {args.eval_items}")
    if args.workers is None:
        args.workers = 0 if args.demo else 4
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if getattr(args, "val_every", 0) < 0:
        p.error(f"--val-every must be >= 0 (0: off), got {args.val_every}")
    if getattr(args, "val_every", 0) and args.val_items < 1:
        p.error(f"--val-items must be >= 1, got {args.val_items}")
    args.out = Path(args.out)
    return args


def _refuse_renamed(p: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """A usage error naming the new option for an old one (`RENAMED`) that this parser lacks."""
    for arg in argv:
        old = arg.split("=", 1)[0]
        if old in RENAMED and old not in p._option_string_actions:
            p.error(f"{old} was renamed: use {RENAMED[old]}")


def _predict_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """--predict needs --from; --out defaults to RUN/predictions."""
    if args.predict is None or args.run is None:
        p.error("--predict IMAGE_OR_FOLDER... and --from RUN go together")
    if args.export is not None:
        p.error("--export writes a model from training checkpoints: give it the training flags, not --predict")
    args.out = Path(args.run) / "predictions" if args.out == p.get_default("out") else Path(args.out)
    return args


def _without_worker_traceback(message: str) -> str:
    """The error's own message where a DataLoader worker raised it: torch re-raises it in the main
    process as "Caught <Error> in DataLoader worker process N. Original Traceback ...: <message>"."""
    if not (message.startswith("Caught ") and "\nOriginal Traceback" in message):
        return message
    last = message.rstrip().splitlines()[-1]  # "unet_seg.errors.InputError: <message>"
    return last.split(": ", 1)[-1]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def run(main: Callable[[], Any], prog: Optional[str] = None) -> None:
    """Call a recipe's `main`; a dataset layout or checkpoint the user must fix ends the run with
    one line on stderr and exit status 1 instead of a traceback, as does a failed sanity check
    (rank 0 says it), and a non-finite loss (each rank that raised it: the loss and its values, what
    was kept, what to try); training stopped by Ctrl-C or SIGTERM (after its checkpoint) with
    "interrupted at step N; ... --resume" and status 130.
    Under torchrun on CPUs (gloo) the process then ends without the interpreter's teardown
    (`unet_seg.train.exit_gloo_process` says why). Warnings are one line each (`"<prog>: warning: ..."`), without the line of source that raised them."""
    try:
        _run(main, prog)
    except SystemExit as e:
        _exit_if_gloo(e.code)
        raise
    except BaseException:
        if _gloo():
            traceback.print_exc()
            _exit_if_gloo(1)
        raise
    _exit_if_gloo(0)


def _gloo():
    """unet_seg.train.distributed when this process joined a gloo group (never imports torch)."""
    distributed = sys.modules.get("unet_seg.train.distributed")
    return distributed if distributed is not None and distributed.joined_gloo() else None


def _exit_if_gloo(status) -> None:
    distributed = _gloo()
    if distributed is not None:
        distributed.exit_gloo_process(status)


def _run(main: Callable[[], Any], prog: Optional[str]) -> None:
    prog = prog or Path(sys.argv[0]).name
    previous, warnings.formatwarning = warnings.formatwarning, lambda message, *_, **__: f"{prog}: warning: {message}\n"
    try:
        main()
    except (DataLayoutError, CheckpointError, InputError) as e:
        sys.exit(f"{prog}: error: {_without_worker_traceback(str(e))}")
    except SanityCheckFailed as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except FloatingPointError as e:
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        sys.exit(f"{prog}: error: {rank}{e}; {NON_FINITE_ADVICE}")
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") == "0":
            from tqdm.auto import tqdm

            tqdm.write(str(e), file=sys.stderr)  # above a progress bar left open, not into it
        sys.exit(130)
    finally:
        warnings.formatwarning = previous
