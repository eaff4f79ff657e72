"""Atomic file and directory writes: every output appears whole under its final name, or not at all.

A crash or kill mid-write leaves the previous output (or nothing), never a torn file that DVC would
then cache. Temporaries sit beside the target so the final rename stays on one filesystem.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reprotune.errors import ReprotuneError


def _umask() -> int:
    """This process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp and mkdtemp create owner-only (0600, 0700) temporaries; renamed into place they would
# stay unreadable to a teammate or a TensorBoard service. Outputs get what open() and mkdir() give,
# as DVC's own checkouts do: 0666 and 0777 less the umask.
FILE_MODE, DIR_MODE = 0o666, 0o777


def _prepare(path: Path) -> list[Path]:
    """Create `path`'s directory and clear stale temporaries beside it, or say why not. Returns the
    directories it created, deepest first, for `_unprepare` to take back if the write fails."""
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise ReprotuneError(f"{path}: cannot write: {parent} is not a directory")
    created = [parent for parent in [path.parent, *path.parent.parents] if not parent.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReprotuneError(f"{path}: cannot write: {exc.strerror or exc}") from None
    _clear_stale(path)
    return created


def _unprepare(created: list[Path]) -> None:
    """Remove the directories `_prepare` created, if they are still empty: a failed write leaves
    the tree as it found it."""
    for directory in created:
        with contextlib.suppress(OSError):
            directory.rmdir()


def _clear_stale(path: Path) -> None:
    """Remove temporaries a killed earlier write left beside `path` (DVC runs one stage at a time)."""
    for stale in [*path.parent.glob(f".{glob.escape(path.name)}.*.tmp"), path.with_name(f".{path.name}.old")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    created = _prepare(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ReprotuneError(f"{path}: cannot write: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    done = False
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE & ~_umask())  # the block may have replaced the file: set the mode on what it left
        os.replace(tmp, path)
        done = True
    except OSError as exc:
        raise ReprotuneError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
        if not done:
            _unprepare(created)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; it replaces `path` if the block succeeds."""
    path = Path(path)
    created = _prepare(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise ReprotuneError(f"{path}: cannot write: {exc.strerror or exc}") from None
    done = False
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE & ~_umask())
        # Two renames: the old directory is moved aside first, so a crash between them leaves the
        # new one complete under its temporary name and the old one whole beside it.
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        done = True
    except OSError as exc:
        raise ReprotuneError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            _unprepare(created)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")  # in the order given: headline keys first


def write_text(path: str | Path, text: str) -> None:
    """Write `text`, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def file_md5(path: str | Path) -> str:
    """The md5 of a file's bytes, read in chunks (DVC's hash: what dvc.lock records for it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()
