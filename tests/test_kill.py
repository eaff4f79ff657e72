"""SIGKILL every stage at a random point: no output is ever torn, and the next `dvc repro` completes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import onnx
import pandas as pd
import pytest
import torch

from conftest import env, run
from reprotune.data import read_archive

pytestmark = pytest.mark.reliability  # every test here is part of the reliability suite

STAGES = ["download", "preprocess", "finetune", "evaluate", "compress", "export", "monitor"]


def assert_whole(root: Path) -> None:
    """Every output that exists under its final name is complete and readable."""
    checks = {
        "data/raw/download/cifar-10-python.tar.gz": read_archive,
        "models/model.pt": lambda p: torch.load(p, weights_only=True)["state_dict"],
        "models/model.compressed.pt": lambda p: torch.load(p, weights_only=True)["state_dict"],
        "models/model.onnx": onnx.load,
        "models/int8/model.int8.onnx": onnx.load,
        "models/model.torchscript.pt": torch.jit.load,
    }
    for name in ("train", "val", "test"):
        checks[f"data/processed/{name}.pt"] = lambda p: torch.load(p, weights_only=True)["images"]
    for path in (root / "metrics").glob("*.json"):
        checks[str(path.relative_to(root))] = lambda p: json.loads(Path(p).read_text())
    for path in (root / "metrics").glob("*.csv"):
        checks[str(path.relative_to(root))] = pd.read_csv
    checks["models/model_card.json"] = lambda p: json.loads(Path(p).read_text())
    for relative, load in checks.items():
        if (root / relative).exists():
            load(root / relative)  # raises on a torn file


def repair_dvc_lock(root: Path) -> None:
    """DVC rewrites `.dvc/tmp/rwlock` in place around each stage, so a SIGKILL in that instant leaves
    it empty, and every later `dvc` command stops at "Unable to read RWLock-file" until it is removed
    (the README's "When something goes wrong" says so). That file is DVC's, not an output of ours:
    remove a torn one, as a user would."""
    lock = root / ".dvc/tmp/rwlock"
    try:
        json.loads(lock.read_text())
    except FileNotFoundError:
        pass
    except ValueError:
        lock.unlink()


def test_sigkill_at_random_points_never_tears_an_output(pipeline, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(pipeline, root, symlinks=True)  # a whole, reproduced pipeline to kill stages of
    rng = random.Random(20261129)
    killed = []
    for stage in STAGES:
        delay = rng.uniform(1.0, 7.0)  # each forced stage takes ~4-12 s here, DVC's start included
        proc = subprocess.Popen(["dvc", "repro", "--force", "--single-item", stage], cwd=root, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # DVC and the stage's python, mid-whatever
            proc.wait()
            killed.append(stage)
            repair_dvc_lock(root)
        assert_whole(root)
    assert len(killed) >= 3, f"only {killed} were killed before finishing: the test tested little"
    run(["dvc", "repro"], root)
    assert json.loads(run(["dvc", "status", "--json"], root).stdout) == {}
    assert_whole(root)
    leftovers = [p for p in root.rglob("*.tmp") if ".dvc" not in p.parts and ".git" not in p.parts]
    assert leftovers == []
