"""SIGKILL every stage at a random point: no output is ever torn, and the next `dvc repro` completes.

Where a kill lands is random, so a torn write is caught here only by chance; tests/test_io.py kills a
write halfway on purpose, every time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import onnx
import pandas as pd
import psutil
import pytest
import torch

from fixtures import env, run
from reprotune.data.cifar import read_archive
from reprotune.data.splits import load_split

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
        checks[f"data/processed/{name}.pt"] = lambda p: load_split(Path(p)).images.load()
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
    (docs/reference/failures.md says so). That file is DVC's, not an output of ours:
    remove a torn one, as a user would."""
    lock = root / ".dvc/tmp/rwlock"
    try:
        json.loads(lock.read_text())
    except FileNotFoundError:
        pass
    except ValueError:
        lock.unlink()


def script_started(proc: subprocess.Popen, stage: str) -> bool:
    """Wait until DVC has started the stage's own script; False if `dvc repro` ended first."""
    script = f"stages/{stage}.py"
    while proc.poll() is None:
        try:
            if any(script in " ".join(child.cmdline()) for child in psutil.Process(proc.pid).children(True)):
                return True
        except psutil.Error:
            pass  # a child that exited while we looked
        time.sleep(0.02)
    return False


def script_seconds(pipeline: Path) -> dict[str, float]:
    """How long each stage's script ran in the pipeline fixture's `dvc repro` (conftest's audit)."""
    records = [json.loads(p.read_text()) for p in (pipeline.parent / "imports").glob("*.json")]
    return {Path(r["argv"][0]).stem: r["seconds"] for r in records if Path(r["argv"][0]).parent.name == "stages"}


def test_sigkill_at_random_points_never_tears_an_output(pipeline, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(pipeline, root, symlinks=True)  # a whole, reproduced pipeline to kill stages of
    seconds = script_seconds(pipeline)
    rng = random.Random(20261129)
    killed = []
    for stage in STAGES:
        last_lock = (root / "dvc.lock").read_bytes()
        proc = subprocess.Popen(["dvc", "repro", "--force", "--single-item", stage], cwd=root, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        # The kill lands at a random share of the script's own run time on this machine (from the
        # fixture's run), counted from its start: in its imports, its work, its writes, or (when this
        # run is quicker) in DVC's bookkeeping after it. Neither DVC's start-up nor the machine's
        # speed decides where.
        started = script_started(proc, stage)
        try:
            proc.wait(timeout=seconds[stage] * rng.uniform(0.05, 0.95) if started else 0)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # DVC and the stage's python, mid-whatever
            proc.wait()
            killed.append(stage)
            repair_dvc_lock(root)
            assert_whole(root)
            # Put the outputs back from DVC's cache (the killed run had removed them), so the next
            # stage runs its real work on real inputs instead of stopping at a missing dependency.
            checkout = run(["dvc", "checkout", "--force"], root, check=False)
            if checkout.returncode != 0 and "dvc.lock" in checkout.stderr:  # "validation failed", or unparsable
                # DVC writes dvc.lock in place too (open "w+", after each stage): killed in that
                # instant, it is cut short. DVC's file, not an output of ours: the last whole one
                # goes back, as a user's `git checkout dvc.lock` would (failures.md).
                (root / "dvc.lock").write_bytes(last_lock)
                checkout = run(["dvc", "checkout", "--force"], root, check=False)
            assert checkout.returncode == 0, checkout.stderr
        else:
            assert proc.returncode == 0, f"{stage} failed without being killed"
            assert_whole(root)
    assert len(killed) >= 3, f"only {killed} were killed before finishing: the test tested little"
    run(["dvc", "repro"], root)
    assert json.loads(run(["dvc", "status", "--json"], root).stdout) == {}
    assert_whole(root)
    leftovers = [p for p in root.rglob("*.tmp") if ".dvc" not in p.parts and ".git" not in p.parts]
    assert leftovers == []
