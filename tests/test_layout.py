"""The layout a newcomer reads: a few files at the top, the rest in packages by concern, each
importing only what lies below it, and the argparse namespace kept to the entries and run/cli.py."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first: a module may import its own unit and the units below it, never one above
LAYERS = {
    "protocols": 0,
    "nets": 0,
    "models": 1,
    "engram": 2,
    "train": 3,
    "analysis": 4,
    "qlora": 5,
    "run": 6,
    "experiment": 7,
    "experiment_7b": 7,
    "predict": 7,
}
ENTRIES = ("experiment.py", "experiment_7b.py", "predict.py")


def sources() -> list[Path]:
    files = sorted(ROOT.glob("*.py"))
    for package in ("nets", "train", "analysis", "qlora", "run"):
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_the_root_holds_the_entries_and_the_studys_modules_only():
    assert sorted(p.name for p in ROOT.glob("*.py")) == sorted(
        ["experiment.py", "experiment_7b.py", "models.py", "engram.py", "protocols.py", "predict.py"]
    )
    for package in ("nets", "train", "analysis", "qlora", "run"):
        assert (ROOT / package / "__init__.py").read_text().startswith('"""'), f"{package}/ says what it holds"


def test_every_module_is_in_a_layer_and_imports_only_below_it():
    upward = []
    for f in sources():
        unit = f.relative_to(ROOT).with_suffix("").parts[0]
        assert unit in LAYERS, f"{f} is in no layer: add its folder to LAYERS and to test_layout's picture"
        for name in imported(ast.parse(f.read_text())):
            top = name.split(".")[0]
            if top in LAYERS and top != unit and LAYERS[top] >= LAYERS[unit]:
                upward.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not upward, upward


def test_the_layer_check_catches_an_upward_import():
    tree = ast.parse("from run.study import run_and_report\nimport analysis.metrics\n")
    assert imported(tree) == ["run.study", "analysis.metrics"]
    assert LAYERS["run"] > LAYERS["train"]  # so train/loop.py importing run.study would be listed


def test_no_module_below_the_entries_takes_the_argparse_namespace():
    """Below the entries and the command-line module, code takes typed settings: no `args.` and no
    parameter named `args`."""
    offenders = []
    for f in sources():
        rel = f.relative_to(ROOT).as_posix()
        if rel in ENTRIES or rel == "run/cli.py":
            continue
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
                offenders.append(f"{rel}:{node.lineno} args.{node.attr}")
            elif isinstance(node, ast.arg) and node.arg == "args":
                offenders.append(f"{rel}:{node.lineno} a parameter named args")
    assert not offenders, offenders


def test_modules_stay_small():
    long = {f.relative_to(ROOT).as_posix(): n for f in sources() if (n := len(f.read_text().splitlines())) > 420}
    assert not long, f"modules over ~400 lines: {long}"
