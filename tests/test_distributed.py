"""DDP on CPU: the finetune stage with train.nproc=2 launches through torchrun (gloo backend).

What two processes must compute: with BatchNorm frozen (strategy linear) exactly what one process
computes with the same global batch; with BatchNorm training (full, and partial with gradual
unfreezing, which rebuilds DDP mid-run), what one process computes when each rank's half of the
batch is normalized by its own statistics and rank 0's running statistics are kept.

Every comparison runs one thread per process: another thread count reorders float sums, and a
from-scratch run amplifies that rounding (when this was written, 2 threads instead of 1 moved a
2-epoch run's weights by three quarters of their whole update). Stated tolerance: 1e-5 on every
weight and buffer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torchvision

from fixtures import env, free_port, make_project, run, set_params
from reprotune.config import Params, load_params
from reprotune.data.splits import load_split
from reprotune.errors import ReprotuneError
from reprotune.training import device, model
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.device import claim_gpu, select_device
from reprotune.training.distributed import torchrun_args
from reprotune.training.loop import finetune

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# Each test sets how it launches (tests share a project). On the CPU whatever the host has: these
# tests compare gloo runs with one process; a machine with one GPU could not give two ranks each a GPU.
TWO_PROCESSES = {"train.nproc": 2, "train.nnodes": 1, "train.device": "cpu"}
FULL = {"train.strategy": "full", "model.weights": "none", "train.unfreeze_after": 0}  # from scratch

# Installed in every training process through PYTHONPATH: records each write-like filesystem call
# inside the project (open for writing, mkdir, rename, remove) to a per-rank log outside it.
AUDIT = '''
import os, sys
_rank = os.environ.get("RANK")
if _rank is not None:
    _root = os.path.realpath(os.getcwd())
    _log = open(os.path.join(os.environ["AUDIT_DIR"], f"rank{_rank}.log"), "a", buffering=1)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}

    def _audit(event, args):
        if event == "open" and isinstance(args[2], int) and args[2] & _WRITE or event in _EVENTS:
            for path in args[:2] if event == "os.rename" else args[:1]:  # a rename's source and target
                if isinstance(path, (str, bytes, os.PathLike)):
                    full = os.path.realpath(os.fsdecode(path))
                    if full.startswith(_root + os.sep):
                        _log.write(f"{event} {os.path.relpath(full, _root)}\\n")

    sys.addaudithook(_audit)
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project with processed data and a stand-in pretrained backbone, training on 2 processes."""
    root = make_project(tmp_path_factory.mktemp("ddp") / "project",
                        {"data.synthetic_train": 320, "data.synthetic_test": 100, "log.graph": False,
                         "train.device": "cpu"})
    torch.manual_seed(7)
    torch.save(torchvision.models.resnet18().state_dict(), root / "backbone.pt")
    run(["dvc", "repro", "preprocess"], root)
    return root


def _train_ddp(root: Path, audit_dir: Path) -> subprocess.CompletedProcess:
    """`dvc repro finetune` with every process's filesystem writes audited."""
    audit_dir.mkdir()
    (audit_dir / "sitecustomize.py").write_text(AUDIT)
    return run(["dvc", "repro", "finetune"], root,
               extra_env={**ONE_THREAD, "PYTHONPATH": str(audit_dir), "AUDIT_DIR": str(audit_dir)})


@pytest.fixture(scope="module")
def one_process(project, tmp_path_factory):
    """`reference(ghost_batchnorm, monkeypatch)`: the single-process run of the project's current
    params (computed once per params) as a state dict."""
    done = {}

    def reference(ghost_batchnorm: bool, monkeypatch) -> dict[str, torch.Tensor]:
        launch = {"train": {"nproc", "nnodes", "rdzv_endpoint"}}  # how the processes start, not what they compute
        key = (load_params(project / "params.yaml").model_dump_json(exclude=launch), ghost_batchnorm)
        if key not in done:
            done[key] = _one_process(project, tmp_path_factory.mktemp("single"), ghost_batchnorm, monkeypatch)
        return done[key]
    return reference


def _one_process(root: Path, tmp_path: Path, ghost_batchnorm: bool, monkeypatch) -> dict[str, torch.Tensor]:
    """The single-process run on one thread: its best model's state dict."""
    if ghost_batchnorm:
        monkeypatch.setattr(model.Classifier, "forward", _per_rank_batchnorm(model.Classifier.forward))
    monkeypatch.chdir(root)  # model.weights is relative to the project
    params = load_params(root / "params.yaml")
    splits = [load_split(root / f"data/processed/{name}.pt") for name in ("train", "val")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = finetune(params, *splits, Checkpoints(tmp_path / "single", "single"))  # one process
    finally:
        torch.set_num_threads(threads)
    return result.model.state_dict()


def _per_rank_batchnorm(forward):
    """Classifier.forward as 2 DDP ranks see a training batch: each half normalized by its own
    BatchNorm statistics; the running statistics are rank 0's (DDP broadcasts rank 0's buffers)."""
    def split_forward(self, images):
        if not self.training:
            return forward(self, images)
        first, second = images.chunk(2)
        logits = [forward(self, first)]
        # The second half updates copies of the running statistics, which are then dropped (swapped,
        # not copied back: autograd has saved the tensors the first half updated).
        kept = [(module, name, buffer) for module in self.modules() for name, buffer in module.named_buffers(
            recurse=False) if buffer is not None]
        for module, name, buffer in kept:
            setattr(module, name, buffer.clone())
        logits.append(forward(self, second))
        for module, name, buffer in kept:
            setattr(module, name, buffer)
        return torch.cat(logits)
    return split_forward


def _assert_close(expected: dict[str, torch.Tensor], path: Path) -> None:
    got = torch.load(path, weights_only=True)["state_dict"]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0, msg=key)


@pytest.mark.dvc
@pytest.mark.torchrun
@pytest.mark.parametrize("strategy", ["linear", "full", "gradual"])
def test_two_processes_train_what_one_process_trains(project, one_process, tmp_path, strategy, monkeypatch):
    overrides = {
        # BatchNorm frozen throughout; every augmentation on, each rank drawing for the global batch;
        # each rank reading its own share of each batch from the disk cache (the reference run: memory)
        "linear": {"train.strategy": "linear", "model.weights": "backbone.pt", "train.rotation": 15.0,
                   "train.color_jitter": 0.4, "train.data_on": "disk"},
        "full": FULL,
        # layer4 and the head, then layer3 too from epoch 2: DDP is rebuilt for the new parameters
        "gradual": {"train.strategy": "partial", "train.unfreeze_from": "layer4", "train.unfreeze_after": 1,
                    "model.weights": "backbone.pt"},
    }[strategy]
    set_params(project / "params.yaml", {"train.unfreeze_after": 0, "train.rotation": 0.0, "train.color_jitter": 0.0,
                                         "train.data_on": "auto", **overrides, **TWO_PROCESSES})
    out = _train_ddp(project, tmp_path / "audit").stdout

    assert "$ torchrun --standalone --nproc-per-node 2" in out
    assert out.count("epoch 2/2 ") == 1  # rank 0 alone reports
    assert ("training from the disk cache" in out) == (strategy == "linear")
    _assert_close(one_process(strategy != "linear", monkeypatch), project / "models/model.pt")

    # Rank 0 wrote the outputs; rank 1 wrote nothing at all inside the project.
    rank0 = (tmp_path / "audit/rank0.log").read_text()
    assert "models/model.pt" in rank0 and "metrics/train.json" in rank0 and "runs/finetune.live" in rank0
    assert (tmp_path / "audit/rank1.log").read_text() == ""
    assert len(list((project / "runs/finetune").glob("events.out.tfevents.*"))) == 1
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert metrics["processes"] == 2 and metrics["epochs"] == 2
    assert run(["dvc", "status", "finetune"], project).stdout.strip() == "Data and pipelines are up to date."


@pytest.mark.dvc
@pytest.mark.torchrun
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_stopped_ddp_run_resumes_to_the_same_weights(project, one_process, monkeypatch, sig):
    set_params(project / "params.yaml", {**FULL, **TWO_PROCESSES})
    checkpoint = project / "runs/finetune.live/checkpoint.pt"
    proc = subprocess.Popen(["python", "stages/finetune.py"], cwd=project, env={**env(), **ONE_THREAD},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # SIGKILL: the launcher dies as under `kill -9`, a CI timeout or the OOM killer. SIGINT: Ctrl-C.
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    else:
        assert proc.returncode == 130, stderr
        assert stderr.strip().splitlines() == ["reprotune: training stopped by signal SIGINT; run the stage "
                                               "again to resume from the last complete epoch"]
    # torchrun starts each rank in a session of its own: they must stop with their launcher.
    deadline = time.monotonic() + 10
    while _running_in(project) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running_in(project) == []
    assert torch.load(checkpoint, weights_only=True)["run"]["epoch"] == 1

    out = run(["python", "stages/finetune.py"], project, extra_env=ONE_THREAD).stdout
    assert "resuming after epoch 1" in out
    _assert_close(one_process(True, monkeypatch), project / "models/model.pt")


@pytest.mark.dvc
@pytest.mark.torchrun
def test_two_machines_on_one_host(project, one_process, tmp_path, monkeypatch):
    port = free_port()
    set_params(project / "params.yaml", {**FULL, "train.nproc": 1, "train.nnodes": 2,
                                         "train.rdzv_endpoint": f"127.0.0.1:{port}"})
    other = tmp_path / "node1"  # the second machine's checkout, data pulled
    shutil.copytree(project, other, ignore=shutil.ignore_patterns("runs", "models", "metrics"))
    before = sorted(p for p in other.rglob("*") if ".git" not in p.parts)
    node1 = subprocess.Popen(["python", "stages/finetune.py", "--node-rank", "1"], cwd=other,
                             env={**env(), **ONE_THREAD}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = run(["python", "stages/finetune.py"], project, extra_env=ONE_THREAD).stdout
    finally:
        node1_out, _ = node1.communicate(timeout=120)
    assert node1.returncode == 0, node1_out
    assert (f"$ torchrun --nnodes 2 --node-rank 0 --rdzv-backend static --rdzv-endpoint 127.0.0.1:{port} "
            "--nproc-per-node 1") in out
    assert "--node-rank 1" in node1_out and "epoch" not in node1_out  # node 1 trains silently
    assert sorted(p for p in other.rglob("*") if ".git" not in p.parts) == before  # and writes nothing
    _assert_close(one_process(True, monkeypatch), project / "models/model.pt")  # the same run as 2 processes


@pytest.mark.dvc
@pytest.mark.torchrun
def test_a_failing_rank_ends_in_one_line(project):
    set_params(project / "params.yaml", {"train.sync_bn": True, **TWO_PROCESSES})
    try:
        proc = run(["python", "stages/finetune.py"], project, check=False)
    finally:
        set_params(project / "params.yaml", {"train.sync_bn": False})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert re.fullmatch(r"reprotune: error: training process rank [01] of 2 failed with exit code 1 \(its error "
                        r"is above\)", lines[-1])
    assert "reprotune: error: train.sync_bn needs CUDA" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.dvc  # the project fixture's `dvc repro preprocess`
def test_node_rank_outside_the_run_is_refused(project):
    proc = run(["python", "stages/finetune.py", "--node-rank", "1"], project, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "reprotune: error: --node-rank 1 is outside 0..0 (train.nnodes=1)"


def _running_in(root: Path) -> list[int]:
    """Processes whose working directory is `root` (Linux /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == root.resolve():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_torchrun_command_lines():
    one_node = Params.model_validate({"train": {"nproc": 4}}).train
    assert torchrun_args(one_node, ["stages/finetune.py"], 0) == [
        "--standalone", "--nproc-per-node", "4", "--max-restarts", "0", "stages/finetune.py"]
    two_nodes = Params.model_validate({"train": {"nproc": 8, "nnodes": 2, "rdzv_endpoint": "node0:29500"}}).train
    assert torchrun_args(two_nodes, ["stages/finetune.py", "--params", "p.yaml"], 1) == [
        "--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "static", "--rdzv-endpoint", "node0:29500",
        "--nproc-per-node", "8", "--max-restarts", "0", "stages/finetune.py", "--params", "p.yaml"]


def test_each_process_takes_the_gpu_of_its_local_rank():
    assert select_device("cpu", local_rank=1) == torch.device("cpu")
    gpus = torch.cuda.device_count()
    if gpus == 0:  # no GPU: CPU for every rank under auto, and cuda is refused
        assert select_device("auto", local_rank=1) == torch.device("cpu")
        with pytest.raises(ReprotuneError, match="train.device=cuda but this machine has no CUDA device"):
            select_device("cuda", local_rank=1)
    else:
        assert select_device("auto", local_rank=gpus - 1) == torch.device(f"cuda:{gpus - 1}")
        with pytest.raises(ReprotuneError, match=rf"train.device=cuda:{gpus} but only {gpus} CUDA device\(s\) "
                                                 r"exist \(one GPU per process: lower train.nproc\)"):
            select_device("cuda", local_rank=gpus)


def test_runs_side_by_side_claim_different_gpus(tmp_path):
    holder = subprocess.Popen(["python", "-c", "import sys; from reprotune.training.device import claim_gpu; "
                               f"print(claim_gpu(3, {str(tmp_path)!r}), flush=True); sys.stdin.read()"],
                              env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        assert [claim_gpu(3, tmp_path), claim_gpu(3, tmp_path)] == [1, 2]
        assert claim_gpu(3, tmp_path) == 0  # every GPU held: share the first
    finally:
        holder.communicate("")  # the holder exits, and the kernel releases its lock
    assert claim_gpu(3, tmp_path) == 0
    for fd in device._HELD:
        os.close(fd)
    device._HELD.clear()
