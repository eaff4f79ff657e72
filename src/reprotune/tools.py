"""The commands of this Python environment (dvc, tensorboard), and an environment for running them:
the CLI's helpers and a sweep's experiments on every node use the same ones."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from reprotune.errors import ReprotuneError


def venv_path() -> str:
    """PATH with this interpreter's bin directory first."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def venv_env() -> dict[str, str]:
    """This environment with `venv_path()`: DVC runs each stage's `python` through the shell."""
    return {**os.environ, "PATH": venv_path()}


def tool(name: str) -> str:
    """The path of this environment's `name` command, or a one-line error."""
    path = shutil.which(name, path=venv_path())
    if path is None:
        raise ReprotuneError(f"{name} is not installed in this environment (run `make install`)")
    return path
