"""What every stage script shares: the `--params` option and one-line error reporting.

Kept apart from `cli.py` so that a stage's import closure (its `deps` in dvc.yaml) holds only the
code the stage runs: editing `reprotune predict` or `reprotune demo` must not rerun the pipeline.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer ships its own click

from reprotune.errors import ParamsError, UsageError, run_cli
from reprotune.rollback import keep_uncached, undo_rejected_run

# The option every stage script and command takes: `--params params.yaml`.
ParamsFile = Annotated[Path, typer.Option("--params", help="Params file.")]


def run_stage(main: Callable[..., None]) -> None:
    """Run a stage script's `main` as a CLI, with reprotune's one-line error reporting."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(main)
    run_cli(lambda: rejecting(lambda: invoke(app)))


def rejecting(call: Callable[[], None]) -> None:
    """Run a stage; if it rejects its params under DVC, first put back what DVC changed before
    running it (its outputs; `-S` values), so a mistake costs nothing. The one error line says so.

    Only where DVC runs the stage in the workspace itself: an experiment in a temporary copy
    (`--temp`, the queue) changed nothing of it. Not in the processes torchrun starts: their
    launcher, a stage process itself, has checked the params first, and ranks must not restore
    outputs side by side.
    """
    stage, root = os.environ.get("DVC_STAGE"), Path.cwd()
    in_workspace = bool(stage) and "LOCAL_RANK" not in os.environ \
        and Path(os.environ.get("DVC_ROOT", "/nonexistent")).resolve() == root.resolve()
    try:
        call()
    except ParamsError as exc:
        if not in_workspace:
            raise
        try:
            undone = undo_rejected_run(stage, root)
        except Exception as undo:  # noqa: BLE001 - the rejection stays the message; say what is left to do
            undone = (f"putting the workspace back failed ({type(undo).__name__}: {undo}): `dvc checkout "
                      f"{stage}` brings its outputs back, `git diff` shows the params")
        raise ParamsError(f"{exc} ({undone})") from exc
    if in_workspace:
        keep_uncached(stage, root)


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
