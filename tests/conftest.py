"""Pytest fixtures and hooks: tiny synthetic projects driven through the real stage scripts and real
DVC, and the tier markers (pyproject.toml). Plain helpers live in fixtures.py."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision

import fixtures
from fixtures import make_project, run, set_params

# Session fixtures that run a real `dvc repro`: their users are `dvc` tests.
PIPELINE_FIXTURES = {"built_pipeline", "pipeline", "exported"}
TIER_MARKERS = {marker for marker in fixtures.TIERS if marker != "gpu"}


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch (and the stages it starts) gets its share of the cores:
    torch's OpenMP threads spin while they wait for each other, and two workers with a thread per core
    each made a 3 s test take minutes on 2 cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark the users of the pipeline fixtures `dvc`; put the files with slow tests (`dvc`, `ray`,
    `torchrun`) first, in their order, so that pytest-xdist (`--dist loadfile --no-loadscope-reorder`:
    a file's tests on one worker, files handed out in this order) starts the long files first and
    ends with short ones; skip `gpu` tests, with the reason, without CUDA."""
    for item in items:
        if PIPELINE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.dvc)
    slow = {item.path for item in items if any(item.get_closest_marker(m) for m in TIER_MARKERS)}
    items.sort(key=lambda item: item.path not in slow)  # stable: each file's tests keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (`make gpu-check` runs these on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Which test is running (before its fixtures are set up), for `fixtures.require`."""
    fixtures.current_test = item


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


def built_once(name: str, tmp_path_factory, build) -> Path:
    """A folder `build` fills once per test run. Under pytest-xdist the workers share it: the first to
    ask builds it (the others wait on a lock), so a fixture that takes a minute is not built once per
    worker. Tests must not change it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / name  # the run's folder, above each worker's own
    with open(folder.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even if `build` fails
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def built_pipeline(tmp_path_factory) -> Path:
    """A tiny project after one real `dvc repro` of all its stages (`project/`), with the reprotune
    modules each stage process loaded and its run time (`imports/<pid>.json`). Never changed: tests
    take `pipeline`, a copy."""
    def build(folder: Path) -> None:
        root = make_project(folder / "project")
        audit = folder / "imports"
        audit.mkdir()
        (audit / "sitecustomize.py").write_text(IMPORT_AUDIT)
        run(["dvc", "repro"], root, extra_env={"PYTHONPATH": str(audit), "REPROTUNE_IMPORT_AUDIT": str(audit)})

    return built_once("pipeline", tmp_path_factory, build)


@pytest.fixture(scope="session")
def pipeline(built_pipeline, tmp_path_factory) -> Path:
    """The tiny project after its `dvc repro`, this worker's own copy: its tests may change it (and put
    it back). What each stage process loaded and how long it ran are in `<project>/../imports/`."""
    mine = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(built_pipeline / "project", mine / "project", symlinks=True)
    shutil.copytree(built_pipeline / "imports", mine / "imports")
    return mine / "project"


@pytest.fixture(scope="session")
def exported(built_pipeline, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny pipeline with every optional output on, after one real `dvc repro` (compress and
    export rerun): compress at ratio 0.3 with one recovery epoch, and the ExecuTorch export (programs
    planned for 24 images, above the 15 that CPU convolution heuristics would narrow the batch axis
    to). The compress, ExecuTorch and record tests share it (read only): export is the slowest stage,
    run once for all."""
    def build(folder: Path) -> None:
        root = folder / "project"
        shutil.copytree(built_pipeline / "project", root, symlinks=True)
        # One recovery epoch, not min_steps' 500 steps, and no accuracy gate: a 2-epoch model on 640
        # images loses points to any pruning, and these tests need the compressed exports (the gate
        # has tests of its own in test_compress.py).
        set_params(root / "params.yaml", {"compress.ratio": 0.3, "compress.epochs": 1, "compress.min_steps": 0,
                                          "compress.max_acc_drop": 1.0, "export.executorch": True,
                                          "export.executorch_max_batch": 24})
        proc = run(["dvc", "repro"], root)
        (folder / "repro.json").write_text(json.dumps({"args": proc.args, "stdout": proc.stdout,
                                                       "stderr": proc.stderr}))

    folder = built_once("exported", tmp_path_factory, build)
    proc = json.loads((folder / "repro.json").read_text())
    return folder / "project", subprocess.CompletedProcess(proc["args"], 0, proc["stdout"], proc["stderr"])


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A ResNet18 state dict with a 1000-class head, like torchvision's ImageNet file."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path
