"""Imports run one way: the hub layer (`hub`, `hub_config`, `pretrained`, `sd`, `ldm`) depends on the
models, the models on nothing of it; and every module of the package imports on its own, first, with
no circle between them."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "unet_seg"
HUB_LAYER = {"unet_seg.hub", "unet_seg.hub_config", "unet_seg.pretrained", "unet_seg.sd", "unet_seg.ldm"}
MODELS = sorted(f"unet_seg.models.{p.stem}" for p in (PACKAGE / "models").glob("*.py") if p.stem != "__init__")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` / `from ... import` names anywhere in the file (inside functions too),
    relative imports resolved against the file's package."""
    package = module_name(path).split(".") if path.stem == "__init__" else module_name(path).split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from .. import hub`
    return names


def test_models_import_nothing_of_the_hub_layer_even_inside_functions():
    assert MODELS, "no model modules found"
    for name in MODELS + ["unet_seg.models"]:
        path = PACKAGE / "models" / ("__init__.py" if name == "unet_seg.models" else f"{name.rsplit('.', 1)[1]}.py")
        wrong = {m for m in imported_modules(path) if any(m == h or m.startswith(h + ".") for h in HUB_LAYER)}
        assert not wrong, f"{name} imports the hub layer: {sorted(wrong)}"


def test_relative_imports_resolve_as_python_resolves_them():
    """The static check above reads what it should: known imports of known files."""
    assert "unet_seg.files" in imported_modules(PACKAGE / "models" / "tokenizer.py")
    assert {"unet_seg.hub_config", "unet_seg.models.unet"} <= imported_modules(PACKAGE / "pretrained.py")
    assert "unet_seg.train.checkpoints" in imported_modules(PACKAGE / "train" / "__init__.py")


# In one interpreter: for each module, forget every unet_seg module, import it first, and record
# which unet_seg modules came with it (a circle fails here as "partially initialized module").
IMPORT_EACH_FIRST = """
import importlib, json, sys
loaded = {}
for name in json.loads(sys.argv[1]):
    for m in [m for m in sys.modules if m == "unet_seg" or m.startswith("unet_seg.")]:
        del sys.modules[m]
    importlib.import_module(name)
    loaded[name] = sorted(m for m in sys.modules if m.startswith("unet_seg."))
print(json.dumps(loaded))
"""


def test_every_module_imports_first_and_models_bring_no_hub_layer():
    names = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")
    run = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_FIRST, json.dumps(names)], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout)
    assert set(loaded) == set(names)
    for name in MODELS + ["unet_seg.models"]:
        assert not HUB_LAYER & set(loaded[name]), f"importing {name} imported {sorted(HUB_LAYER & set(loaded[name]))}"
    assert {"unet_seg.hub_config", "unet_seg.models.unet"} <= set(loaded["unet_seg.pretrained"])  # the check can see imports
