"""The architecture holds: commands load only what they use (no Ray or Optuna for the registry, results and
tracked training commands), and test modules share code through conftest.py and tests/helpers only. The
import layers themselves are checked by ``lint-imports`` (contracts in pyproject.toml) in the test command."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY

TESTS = Path(__file__).resolve().parent

PROBE = """
import json, sys
from kdray.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "loaded": sorted(m for m in ("ray", "optuna") if m in sys.modules)}))
"""


def loaded_by(argv: list[str], cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("commands")
    raw = {**TINY, "train": {"epochs": 1, "progress": False}}
    (d / "cfg.yaml").write_text(yaml.safe_dump(raw))
    (d / "search").mkdir()
    pd.DataFrame({"trial_id": ["t1"], "status": ["finished"], "val_acc": [0.5]}).to_parquet(d / "search/results.parquet")
    return d


@pytest.mark.parametrize("argv", [
    ["models", "list"],
    ["promote", "nope", "--alias", "champion"],
    ["results", "search"],
    ["train", "cfg.yaml", "--track", "--output-dir", "run", "--experiment", "arch"],
], ids=["models list", "promote", "results", "train --track"])
def test_commands_that_need_no_search_do_not_import_ray_or_optuna(workdir, argv):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    if argv[0] != "results":
        argv = argv + ["--tracking-uri", uri]
    got = loaded_by(argv, workdir)
    assert got["loaded"] == [], got
    assert got["code"] == (2 if argv[0] == "promote" else 0), got  # promote of a missing model is refused


def test_no_test_module_imports_another():
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.split(".")[-1].startswith("test_"), (path.name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[-1].startswith("test_") for a in node.names), path.name


def test_functions_and_modules_are_short():
    """No function over 60 lines and no module over 450 lines in kdray/ (issue 14): a newcomer reads each piece
    in one screen or two."""
    root = TESTS.parent / "kdray"
    long_modules, long_functions = [], []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 450:
            long_modules.append(f"{path.relative_to(root)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long_functions.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {n} lines")
    assert not long_modules and not long_functions, long_modules + long_functions


def test_every_kdray_import_in_the_repository_resolves():
    """Imports inside functions (benchmarks, lazy command imports) are only run on their paths: check them all
    statically, so a moved name cannot hide until someone runs that path."""
    import importlib
    import importlib.util

    missing = []
    for path in [*(TESTS.parent / "kdray").rglob("*.py"), *(TESTS.parent / "benchmarks").rglob("*.py"),
                 *TESTS.rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdray":
                module = importlib.import_module(node.module)
                missing += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing, missing
