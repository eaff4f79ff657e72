"""The layer rules hold on the real import graph: import-linter's contracts in pyproject.toml.

The serving image has no torch, so `reprotune.inference` must not import it, directly or through
another module (checked by import-linter, imports inside functions included, and by importing the
server and the predict command in a fresh interpreter); data never imports training; nothing
imports the CLI; no package imports one above it. The checks are shown to fail: each contract is
broken on purpose in a copy of the package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import REPO

LINT = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under `root`/src, with `root`/pyproject.toml's contracts."""
    env = {"PYTHONPATH": str(root / "src"), "PATH": str(Path(sys.executable).parent), "HOME": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_every_layer_contract(tmp_path):
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    result = _lint(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    # torch straight into the protocol, which the torch-free server imports
    ("inference/protocol.py", "import torch", "Inference imports no torch"),
    # torch through another module: the request log borrowing a helper that needs torch
    ("inference/requestlog.py", "from reprotune.tensorfiles import save_torch", "Inference imports no torch"),
    # data reaching up into training, inside a function (a lazy import is still an import)
    ("data/splits.py", "def _f():\n    from reprotune.training import model", "Layers"),
    # anything importing the CLI
    ("tracking/review.py", "from reprotune import cli", "Layers"),
])
def test_an_injected_forbidden_import_breaks_its_contract(tmp_path, module, line, broken):
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    target = tmp_path / "src/reprotune" / module
    target.write_text(target.read_text() + f"\n\n{line}\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert any(row.startswith(broken) and " BROKEN" in row for row in result.stdout.splitlines()), result.stdout


def test_the_server_and_predict_load_no_torch_in_a_fresh_interpreter():
    modules = ["reprotune.cli", "reprotune.inference.server", "reprotune.inference.predict",
               "reprotune.inference.protocol", "reprotune.inference.requestlog", "reprotune.inference.runtime",
               "reprotune.inference.cluster"]
    probe = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
             "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
