"""What every stage script shares: the `--params` option and one-line error reporting.

Kept apart from `cli.py` so that a stage's import closure (its `deps` in dvc.yaml) holds only the
code the stage runs: editing `reprotune predict` or `reprotune demo` must not rerun the pipeline.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer ships its own click

from reprotune.errors import UsageError, run_cli

# The option every stage script and command takes: `--params params.yaml`.
ParamsFile = Annotated[Path, typer.Option("--params", help="Params file.")]


def run_stage(main: Callable[..., None]) -> None:
    """Run a stage script's `main` as a CLI, with reprotune's one-line error reporting."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(main)
    run_cli(lambda: invoke(app))


def invoke(app: typer.Typer) -> None:
    """Run a typer app on sys.argv. A mistake in the command line becomes the same one line as every
    other failure (`reprotune: error: ...`, exit 2), not click's boxed usage panel."""
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as exc:  # no arguments at all: the help is the answer
        print(exc.format_message(), file=sys.stderr)
        sys.exit(exc.exit_code)
    except ClickException as exc:
        raise UsageError(exc.format_message()) from None
    except typer.Abort:
        raise KeyboardInterrupt from None
    if isinstance(code, int) and code:
        sys.exit(code)
