"""Resumable training state, kept where `dvc repro` does not delete it.

DVC removes a stage's outputs before running it, so the finetune stage works in a directory that
is not an output (`runs/finetune.live/`): the per-epoch checkpoint and the live TensorBoard log sit
there, under a key hashed from everything that determines the run (params, the processed data, the
library's source). A rerun with the same key resumes from the last complete epoch; any other key
starts fresh. When training finishes the stage publishes the log to `runs/finetune/` and removes
the directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from reprotune.config import Params
from reprotune.errors import ReprotuneError
from reprotune.files import write_text
from reprotune.tensorfiles import load_torch, save_torch

CHECKPOINT = "checkpoint.pt"
KEY = "key"


def run_key(params: Params, inputs: list[Path], sections: tuple[str, ...] = ("model", "train", "log")) -> str:
    """sha256 over the params that shape training (`sections`), the input files and the reprotune code
    this process has loaded (the stage's code deps in dvc.yaml, no more: editing `inference/predict.py` does not
    throw away a paused run)."""
    digest = hashlib.sha256()
    sections = {"seed": params.seed, **{s: getattr(params, s).model_dump() for s in sections}}
    digest.update(json.dumps(sections, sort_keys=True).encode())
    code = sorted(Path(module.__file__) for name, module in list(sys.modules.items())
                  if name.split(".")[0] == "reprotune" and getattr(module, "__file__", None))
    for path in [*inputs, *code]:
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


class Checkpoints:
    """The work directory of one training run: its key, its checkpoint, its live TensorBoard log."""

    def __init__(self, directory: Path, key: str):
        self.directory, self.key = Path(directory), key
        self.logdir = self.directory / "tb"

    def resume(self) -> dict | None:
        """The last complete epoch's state if this run was interrupted; else a clean directory."""
        key_file, checkpoint = self.directory / KEY, self.directory / CHECKPOINT
        if key_file.is_file() and key_file.read_text() == self.key and checkpoint.is_file():
            try:
                state = load_torch(checkpoint, "training checkpoint")
            except ReprotuneError as exc:  # damaged by something other than our atomic writes
                print(f"{exc}: starting fresh", flush=True)
                state = None
            if isinstance(state, dict) and state.get("key") == self.key:
                return state
        elif checkpoint.is_file():
            print(f"{self.directory}: its checkpoint is of other params, data or code: starting fresh", flush=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        write_text(self.directory / KEY, self.key)
        return None

    def save(self, state: dict) -> None:
        """Replace the checkpoint atomically: a kill leaves the previous epoch's, never half of one."""
        save_torch(self.directory / CHECKPOINT, {**state, "key": self.key})

    def remove(self) -> None:
        """Forget the run once its outputs are published."""
        shutil.rmtree(self.directory, ignore_errors=True)
