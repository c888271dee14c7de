"""Every code block of README.md and docs/**/*.md is run or checked, so the documentation cannot
drift from the code.

- ```python blocks run, on the CPU, in a scratch folder holding a link to `recipes/`. The blocks of
  one page share one namespace and run in order, as a reader types them.
- ```bash blocks: each command line (continuations joined, comments dropped) is checked.
  `python recipes/x.py ...` and `torchrun ... recipes/x.py ...` parse with the recipe's own
  `parse_args` (a stale or misspelt option fails; absolute paths are replaced by empty scratch
  folders, so real data roots pass the existence check), `python -m unet_seg ...` and
  `python -m unet_seg.demo_pretrain ...` with theirs (`python -m unet_seg` without `--model`, the
  tiny demo, also runs in-process), `pip install -e ".[x]"` must name extras of
  pyproject.toml; `python -m pytest`, `git`, `cd`, `export` and `mkdocs` lines are accepted as
  they are. Any other command fails the test: give it a checker here or opt the block out.
- Blocks without a language or in another one (output, a folder layout, a table) are not code.
- Inline code outside the blocks (a table's cells, prose) that is a recipe command,
  `python recipes/x.py ...` or `torchrun ... recipes/x.py ...`, parses as the bash blocks' do
  (a `...` standing for more options is dropped).

**Opting out.** A block that needs what a test machine lacks (real weights, a dataset, a GPU,
a trained run) says so in its fence, visibly on the rendered site, with a title that starts with
"needs":

    ```python title="needs SD 2.1 weights and a GPU"

Such a python block is only compiled (a syntax error still fails); such a bash block is only split
into words (quotes must close). Everything else must run as written.
"""

from __future__ import annotations

import re
import shlex
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import load_recipe

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    flags=re.M | re.S,
)
OPT_OUT = re.compile(r"""\btitle=(["'])needs\b""")
ACCEPTED = {("python", "-m", "pytest"), ("git",), ("cd",), ("export",), ("mkdocs",)}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    info: str
    code: str

    @property
    def opted_out(self) -> bool:
        return bool(OPT_OUT.search(self.info))

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(text: str, page: Path = ROOT / "README.md") -> list[Block]:
    """The fenced code blocks of a Markdown page (indented fences too: admonitions, lists)."""
    found = []
    for m in FENCE.finditer(text):
        info = m["info"].strip()
        body = "\n".join(line[len(m["indent"]) :] for line in m["body"].splitlines())
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, (info.split() or [""])[0].lower(), info, body))
    return found


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ---------------------------------------------------------------- python


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.language == "python" for b in blocks(p.read_text(), p))], ids=page_id)
def test_python_blocks_run_in_order_on_the_cpu(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.setattr(sys, "path", list(sys.path))  # a block's sys.path.insert stays in this test
    namespace = {"__name__": "__docs__"}
    for block in blocks(page.read_text(), page):
        if block.language != "python":
            continue
        code = compile(block.code, block.where, "exec")
        if block.opted_out:
            continue
        try:
            exec(code, namespace)
        except Exception as e:
            raise AssertionError(f"the python block at {block.where} fails: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------- bash


def command_lines(code: str) -> list[list[str]]:
    """Each command of a bash block as words: continuations joined, comments and `VAR=value`
    prefixes dropped, `a && b` split into two commands."""
    commands = []
    for words in (shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines()):
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "||"):
                while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
                    command.pop(0)
                if command:
                    commands.append(command)
                command = []
            else:
                command.append(word)
    return commands


def check_command(words: list[str], scratch: Path) -> None:
    """Raise AssertionError (or SystemExit from a parser) if `words` is not a command that works."""
    if words[0] == "torchrun":
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        words = ["python", *words[script:]]
    if any(tuple(words[: len(a)]) == a for a in ACCEPTED):
        return
    if words[:2] == ["pip", "install"]:
        extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        for word in words[2:]:
            m = re.fullmatch(r"\.\[(.*)\]", word)
            if m:
                assert set(m[1].split(",")) <= extras, f"{word}: pyproject.toml's extras are {sorted(extras)}"
        return
    assert words[0] == "python", f"no checker for {shlex.join(words)!r}: add one to tests/test_docs.py or opt the block out"
    if words[1].startswith("recipes/") and words[1].endswith(".py"):
        load_recipe(Path(words[1]).stem).parse_args(scratch_paths(words[2:], scratch))
    elif words[1:3] == ["-m", "unet_seg"]:
        from unet_seg import __main__ as cli

        argv = scratch_paths(words[3:], scratch)
        argv += [] if "--out" in argv else ["--out", str(scratch / "unet_seg_demo.png")]
        args = cli.parse_args(argv)
        if args.model is None:  # the tiny random-weight demo takes a second: run it
            with pytest.MonkeyPatch.context() as m:
                m.setattr(sys, "argv", ["python -m unet_seg", *argv])
                cli.main()
            assert Path(args.out).is_file(), f"{shlex.join(words)} wrote no {args.out}"
    elif words[1:3] == ["-m", "unet_seg.demo_pretrain"]:
        from unet_seg.demo_pretrain import parse_args

        parse_args(scratch_paths(words[3:], scratch))
    else:
        raise AssertionError(f"no checker for {shlex.join(words)!r}: add one to tests/test_docs.py or opt the block out")


def scratch_paths(argv: list[str], scratch: Path) -> list[str]:
    """Absolute paths (data roots) replaced by empty folders under `scratch`."""
    out = []
    for word in argv:
        if word.startswith("/"):
            word = str(scratch / word.lstrip("/"))
            Path(word).mkdir(parents=True, exist_ok=True)
        out.append(word)
    return out


def failures(commands: list[tuple[str, list[str]]], scratch: Path, capsys) -> list[str]:
    """`check_command` on each (where, words) -> one message per command that does not work."""
    found = []
    for where, words in commands:
        try:
            check_command(words, scratch)
        except SystemExit as e:
            found.append(f"{where}: {shlex.join(words)}\n    exit {e.code}: {capsys.readouterr().err.strip()}")
        except AssertionError as e:
            found.append(f"{where}: {e}")
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.language in ("bash", "sh", "shell") for b in blocks(p.read_text(), p))], ids=page_id)
def test_bash_blocks_name_commands_and_options_that_exist(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    commands = []
    for block in blocks(page.read_text(), page):
        if block.language not in ("bash", "sh", "shell"):
            continue
        lines = command_lines(block.code)
        if not block.opted_out:
            commands += [(block.where, words) for words in lines]
    found = failures(commands, tmp_path / "scratch", capsys)
    assert not found, "\n".join(found)


# ---------------------------------------------------------------- inline code

CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", flags=re.S)
RECIPE_COMMAND = re.compile(r"(?:python|torchrun)\s(?:\S+\s)*?recipes/\w+\.py(?:\s|$)")


def inline_commands(text: str, page: Path = ROOT / "README.md") -> list[tuple[str, list[str]]]:
    """The recipe commands written as inline code outside the fenced blocks (a table's cells,
    prose, a span wrapped over lines) -> (page:line, words), a `...` for more options dropped."""
    prose = FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)  # the blocks' lines kept blank: line numbers stay
    found = []
    for paragraph in re.finditer(r"(?:[^\n]*\S[^\n]*(?:\n|$))+", prose):  # a span does not cross a blank line
        for m in CODE_SPAN.finditer(paragraph[0]):
            span = " ".join(m[2].split())
            if RECIPE_COMMAND.match(span):
                line = prose.count("\n", 0, paragraph.start() + m.start()) + 1
                found.append((f"{page.relative_to(ROOT)}:{line}", [w for w in shlex.split(span) if w not in ("...", "…")]))
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if inline_commands(p.read_text(), p)], ids=page_id)
def test_inline_recipe_commands_name_options_that_exist(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    found = failures(inline_commands(page.read_text(), page), tmp_path / "scratch", capsys)
    assert not found, "\n".join(found)


# ---------------------------------------------------------------- the harness itself


def test_blocks_finds_fences_indented_ones_and_opt_outs():
    text = textwrap.dedent(
        """\
        Text.

        ```python
        x = 1
        ```

        !!! note
            ```bash title="needs a dataset"
            python recipes/diff_gta2cs.py --data-root /data
            ```

        ```
        output
        ```
        """
    )
    found = blocks(text)
    assert [(b.line, b.language, b.opted_out, b.code) for b in found] == [
        (3, "python", False, "x = 1"),
        (8, "bash", True, "python recipes/diff_gta2cs.py --data-root /data"),
        (12, "", False, "output"),
    ]


def test_command_lines_join_continuations_split_and_drop_comments_and_env():
    code = 'OMP_NUM_THREADS=2 python recipes/a.py --x 1 \\\n    --y "a b"   # comment\npip install -e . && python -m pytest -q\n'
    assert command_lines(code) == [
        ["python", "recipes/a.py", "--x", "1", "--y", "a b"],
        ["pip", "install", "-e", "."],
        ["python", "-m", "pytest", "-q"],
    ]


@pytest.mark.parametrize(
    "line",
    [
        "python recipes/diffews_coco20i.py --no-such-option 1",  # a stale or misspelt option
        "python recipes/diffews_coco20i.py --size 100",  # a value the recipe refuses
        "torchrun --nproc_per_node=2 recipes/diff_gta2cs.py --steps x",
        "python -m unet_seg --t 1000",
        'pip install -e ".[no-such-extra]"',
        "python some_script.py",  # no checker
        "curl https://example.com",
    ],
)
def test_a_command_that_does_not_work_is_caught(line, tmp_path, capsys):
    with pytest.raises((SystemExit, AssertionError)):
        for words in command_lines(line):
            check_command(words, tmp_path)


def test_inline_commands_are_found_in_tables_and_prose_and_a_stale_option_is_caught(tmp_path, monkeypatch, capsys):
    text = textwrap.dedent(
        """\
        | method | command |
        |---|---|
        | DiffewS | `torchrun --nproc_per_node=8 recipes/diffews_coco20i.py --data-root /data/coco --no-such-option 1` |
        | DIFF | `python recipes/diff_gta2cs.py --model m --data-root /data ...` |

        Run `python recipes/<recipe>.py` or `python
        recipes/digseg_ade20k.py --steps 4`; ``pip install unet_seg`` is no recipe command.

        ```bash
        python recipes/diffews_coco20i.py --also-stale
        ```
        """
    )
    found = inline_commands(text)
    assert found == [
        ("README.md:3", ["torchrun", "--nproc_per_node=8", "recipes/diffews_coco20i.py", "--data-root", "/data/coco", "--no-such-option", "1"]),
        ("README.md:4", ["python", "recipes/diff_gta2cs.py", "--model", "m", "--data-root", "/data"]),
        ("README.md:6", ["python", "recipes/digseg_ade20k.py", "--steps", "4"]),
    ]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    messages = failures(found, tmp_path / "scratch", capsys)
    assert len(messages) == 1 and messages[0].startswith("README.md:3: ") and "unrecognized arguments: --no-such-option 1" in messages[0]


def test_a_real_run_with_absolute_data_roots_parses(tmp_path):
    (words,) = command_lines("torchrun --nproc_per_node=8 recipes/diffews_coco20i.py --model m --data-root /data/coco --fold 1")
    check_command(words, tmp_path)
    assert (tmp_path / "data" / "coco").is_dir()


# ---------------------------------------------------------------- the site


def test_every_docs_page_is_in_the_sites_nav_and_every_nav_entry_exists():
    nav = re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    pages = {str(p.relative_to(ROOT / "docs")) for p in PAGES[1:]}
    assert sorted(set(nav)) == sorted(pages), "mkdocs.yml's nav and docs/**/*.md differ"


def test_every_module_has_its_place_in_the_api_reference():
    """A new module shows up in the reference (docs/reference/*.md `::: unet_seg.x` blocks)."""
    documented = set(re.findall(r"^::: (unet_seg[\w.]*)", "\n".join(p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md")), flags=re.M))
    modules = set()
    for path in (ROOT / "unet_seg").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert modules - documented == {"unet_seg", "unet_seg.__main__"}
    assert documented <= modules
