"""What every stage script shares: the `--params` option and one-line error reporting.

Kept apart from `cli.py` so that a stage's import closure (its `deps` in dvc.yaml) holds only the
code the stage runs: editing `reprotune predict` or `reprotune demo` must not rerun the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from reprotune.errors import run_cli

# The option every stage script and command takes: `--params params.yaml`.
ParamsFile = Annotated[Path, typer.Option("--params", help="Params file.")]


def run_stage(main: Callable[..., None]) -> None:
    """Run a stage script's `main` as a CLI, with reprotune's one-line error reporting."""
    run_cli(lambda: typer.run(main))
