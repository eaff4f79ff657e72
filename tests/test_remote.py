"""Shared storage: `dvc push` from one clone, `dvc pull` in a fresh one, and nothing left to rebuild."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import run

# What a teammate's fresh clone must get back from the remote: data, models and TensorBoard runs.
CACHED = ["data/raw/cifar-10-python.tar.gz", "data/processed/train.pt", "data/processed/test.pt",
          "models/model.pt", "models/model.onnx", "models/model.int8.onnx", "models/model.torchscript.pt"]
RUNS = ["download", "preprocess", "finetune", "evaluate", "export"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_push_then_pull_into_a_fresh_clone_restores_everything(pipeline, tmp_path):
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "--default", "shared", str(remote)], pipeline)
    run(["git", "add", "-A"], pipeline)
    run(["git", "commit", "-q", "-m", "results and shared storage"], pipeline)
    run(["dvc", "push"], pipeline)
    assert any(remote.rglob("*")), "nothing reached the remote"

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(pipeline), str(clone)], tmp_path)
    assert not (clone / "models/model.pt").exists()  # git holds only pointers and small metrics
    run(["dvc", "pull"], clone)

    for path in CACHED:
        assert _md5(clone / path) == _md5(pipeline / path), path
    for stage in RUNS:
        assert list((clone / "runs" / stage).glob("events.out.tfevents.*")), stage
    assert json.loads(run(["dvc", "status", "--json"], clone).stdout) == {}
    out = run(["dvc", "repro"], clone).stdout
    assert "Data and pipelines are up to date." in out and "Running stage" not in out
