"""User-facing failures: one clear line on stderr and a non-zero exit, traceback only on request."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class ReprotuneError(Exception):
    """A failure the user can act on; its message is the whole story, printed on one line."""

    exit_code = 1


class ParamsError(ReprotuneError):
    """The params file, or a value in it, is rejected: raised before a stage writes anything, so the
    stage can put back what DVC removed before running it (reprotune.rollback)."""


class UsageError(ReprotuneError):
    """The command line itself is wrong (an unknown option, a value out of range)."""

    exit_code = 2


class Interrupted(ReprotuneError):
    """The user stopped the run (Ctrl-C) and it wound down cleanly."""

    exit_code = 130


def first_line(exc: BaseException) -> str:
    """An exception's first non-blank line (its type's name if it has none): for one-line messages
    built from a library's multi-line errors."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI entry point; turn any failure into one stderr line and exit 1 (130 on Ctrl-C).

    `--debug` anywhere on the command line, or REPROTUNE_DEBUG=1, shows the full traceback instead.
    """
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["REPROTUNE_DEBUG"] = "1"
    try:
        main()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("reprotune: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one place every failure is reported
        if os.environ.get("REPROTUNE_DEBUG") == "1":
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, ReprotuneError):
            message = f"unexpected {type(exc).__name__}: {message} (--debug shows the traceback)"
        print(f"reprotune: {'' if isinstance(exc, Interrupted) else 'error: '}{message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
