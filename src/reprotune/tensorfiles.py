"""Saving and loading torch artifacts (models, checkpoints, splits, the drift reference): atomically,
and loaded with weights_only=True so that a file which tries to run code is refused, not run.

Apart from `files.py` so that what imports `files.py` (the torch-free server among them) loads no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reprotune.errors import ReprotuneError
from reprotune.files import atomic_file


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save `obj` (plain dicts of tensors and primitives only), atomically. Through an open file:
    torch.save names the zip's inner folder after a path it is given (here a random temporary name),
    so the same weights made different bytes, and a rerun or another machine a different md5."""
    with atomic_file(path) as tmp, open(tmp, "wb") as out:
        torch.save(obj, out)


def load_torch(path: str | Path, what: str) -> Any:
    """torch.load with weights_only=True: a file that tries to run code is refused, not run."""
    path = Path(path)
    if not path.is_file():
        raise ReprotuneError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ReprotuneError(f"{path}: not a readable {what} ({first})") from None
