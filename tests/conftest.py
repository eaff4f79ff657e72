"""Shared fixtures: tiny synthetic projects driven through the real stage scripts and real DVC."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "src", ".dvc/config", ".dvcignore", ".gitignore",
                 "data/incoming/README.md"]

# A pipeline small enough to run in seconds on 2 CPU cores, through exactly the real code path.
TINY = {
    "data.dataset": "synthetic",
    "data.synthetic_train": 640,
    "data.synthetic_test": 200,
    "model.weights": "none",
    "train.epochs": 2,
    "train.batch_size": 32,
    "train.lr": 0.05,
    "log.images": 8,
    "export.check_images": 16,
    "export.calibration_images": 64,
    "export.int8_min_agreement": 0.5,  # a 2-epoch model has small margins for int8 to keep
    "export.latency_runs": 5,
    # The same run on every host: CUDA's path is what the `gpu`-marked tests (make gpu-check) take.
    "train.device": "cpu",
}


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need CUDA: skipped, with the reason, on machines without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (`make gpu-check` runs these on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def env() -> dict[str, str]:
    """The environment stages and DVC run in: this venv first on PATH, git identity, no debug."""
    environ = {k: v for k, v in os.environ.items() if k != "REPROTUNE_DEBUG"}
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])
    for role in ("AUTHOR", "COMMITTER"):
        environ[f"GIT_{role}_NAME"] = "reprotune tests"
        environ[f"GIT_{role}_EMAIL"] = "tests@reprotune.invalid"
    return environ


def run(args: list[str], cwd: Path, check: bool = True, timeout: float = 600,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command in `cwd`; on an unexpected exit code, fail with its output."""
    proc = subprocess.run(args, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> int:
    """A TCP port nothing listens on now, on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_params(path: Path, overrides: dict) -> None:
    """Apply dotted-key overrides to a params file."""
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(root: Path, overrides: dict | None = None) -> Path:
    """A fresh git + DVC project holding the pipeline, with `overrides` applied and committed."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src, dest = REPO / name, root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest)
    set_params(root / "params.yaml", {**TINY, **(overrides or {})})
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "tiny pipeline"], root)
    return root


# Installed through PYTHONPATH in the stage processes of the `pipeline` fixture: when a process
# exits, it records which reprotune modules it loaded (tests/test_lineage.py compares with dvc.yaml)
# and how long it ran (tests/test_kill.py spreads its kills over each stage's life on this machine).
IMPORT_AUDIT = """
import atexit, json, os, sys, time

_started = time.monotonic()

def _record():
    loaded = sorted(n for n in sys.modules if n.split(".")[0] == "reprotune")
    if loaded:
        with open(os.path.join(os.environ["REPROTUNE_IMPORT_AUDIT"], f"{os.getpid()}.json"), "w") as f:
            json.dump({"argv": sys.argv, "modules": loaded, "seconds": time.monotonic() - _started}, f)

atexit.register(_record)
"""


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """A tiny project after one real `dvc repro` of all its stages. Each stage process's loaded
    reprotune modules and run time are recorded in `<project>/../imports/<pid>.json`."""
    root = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    audit = root.parent / "imports"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(IMPORT_AUDIT)
    run(["dvc", "repro"], root, extra_env={"PYTHONPATH": str(audit), "REPROTUNE_IMPORT_AUDIT": str(audit)})
    return root


@pytest.fixture(scope="session")
def exported(pipeline, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny pipeline with every optional output on, after one real `dvc repro` (compress and
    export rerun): compress at ratio 0.3 with one recovery epoch, and the ExecuTorch export (programs
    planned for 24 images, above the 15 that CPU convolution heuristics would narrow the batch axis
    to). The compress and ExecuTorch tests share it: export is the slowest stage, run once for both."""
    root = tmp_path_factory.mktemp("exported") / "project"
    shutil.copytree(pipeline, root, symlinks=True)
    # One recovery epoch, not min_steps' 500 steps, and no accuracy gate: a 2-epoch model on 640
    # images loses points to any pruning, and these tests need the compressed exports (the gate has
    # tests of its own in test_compress.py).
    set_params(root / "params.yaml", {"compress.ratio": 0.3, "compress.epochs": 1, "compress.min_steps": 0,
                                      "compress.max_acc_drop": 1.0, "export.executorch": True,
                                      "export.executorch_max_batch": 24})
    return root, run(["dvc", "repro"], root)


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A ResNet18 state dict with a 1000-class head, like torchvision's ImageNet file."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path
