"""The README's install and quick start are what a newcomer can run top to bottom, and its test command is CI's."""

import re
import subprocess
import sys
from pathlib import Path

from .helpers import load_recipe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
INSTALL = README.split("## Install")[1].split("\n## ")[0]
QUICK_START = README.split("## Quick start")[1].split("\n## ")[0]


def bash_lines(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_cpu_torch_comes_before_the_commands_that_install_torch():
    assert "pip install" not in README.split("## Install")[0]
    assert INSTALL.index("download.pytorch.org/whl/cpu") < INSTALL.index("pip install -e")


def test_the_quick_start_runs_recipes_with_no_arguments_as_their_demos():
    """The first, a short demo (the prototype demo's first 250 steps: about 2 min on 2 cores), then
    the longer DiffewS demo."""
    first, second = bash_lines(QUICK_START)[:2]
    assert (first, second) == ("python recipes/fewshot_prototypes_coco20i.py --steps 250", "python recipes/diffews_coco20i.py")
    for recipe, argv in (("fewshot_prototypes_coco20i", ["--steps", "250"]), ("diffews_coco20i", [])):
        args = load_recipe(recipe).parse_args(argv)
        assert args.demo and args.demo_reason.startswith("no --data-root: running the synthetic demo")


def test_ci_runs_the_readmes_test_command_with_work_stealing():
    command = next(line for line in bash_lines(QUICK_START) if "pytest" in line)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "-n 2 --dist worksteal" in command


def test_slow_tests_are_collected_first():
    """So that with work stealing no worker is left running minute-long tests one by one at the end."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_recipe_diffews.py"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout  # fmt: skip
    ids = [line for line in out.splitlines() if "::" in line]
    slow = [i for i in ids if "shortened_demo" in i]
    assert slow and ids[: len(slow)] == slow and len(ids) > len(slow)
