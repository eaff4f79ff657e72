"""Kill the finetune stage mid-run, rerun it, and get exactly what an uninterrupted run gets.

Each test runs on the CPU, and again on CUDA where there is a GPU (`pytest -m gpu`, run by
`make gpu-check`): there the paused epoch's tensors must go back to the GPU, and deterministic
mode must hold with cuBLAS, cuDNN and fp16 autocast with its GradScaler.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fixtures import REPO, env, run, set_params, synthetic_splits
from reprotune.data.splits import save_split

pytestmark = pytest.mark.reliability  # every test here is part of the reliability suite

EPOCHS = 3  # a kill after epoch 1 leaves two to resume: the schedule, EMA and log carry on twice
TRAIN_IMAGES = 480
# Optimizer steps per epoch: more on a GPU, whose epochs are so short that a Ctrl-C sent when the
# first checkpoint appears could otherwise land after the last step.
STEPS = {"cpu": 15, "cuda": 60}


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    return request.param


def _workspace(root: Path, device: str = "cpu") -> Path:
    """Processed splits and params for an EPOCHS-epoch deterministic run on `device`."""
    (root / "data/processed").mkdir(parents=True)
    for name, split in synthetic_splits(TRAIN_IMAGES * 5 // 4, 10, 0.2).items():
        save_split(split, root / "data/processed" / f"{name}.pt")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    set_params(root / "params.yaml", {"model.weights": "none", "train.epochs": EPOCHS,
                                      "train.batch_size": TRAIN_IMAGES // STEPS[device],
                                      "train.lr": 0.05, "train.deterministic": True, "train.ema_decay": 0.9,
                                      "train.warmup_epochs": 0.5, "model.dropout": 0.2, "log.graph": False,
                                      # 4 logged images, not the default 32: a grid is still drawn each
                                      # epoch, and a run takes a quarter less time
                                      "log.histograms": False, "log.images": 4, "train.device": device})
    return root


def _finetune(root: Path) -> subprocess.CompletedProcess:
    return run(["python", str(REPO / "stages/finetune.py")], root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, device) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    root = _workspace(tmp_path_factory.mktemp("uninterrupted"), device)
    _finetune(root)
    return root


def _same_weights(reference: Path, resumed: Path) -> None:
    expected = torch.load(reference / "models/model.pt", weights_only=True)["state_dict"]
    got = torch.load(resumed / "models/model.pt", weights_only=True)["state_dict"]
    for key, value in expected.items():
        assert torch.equal(got[key], value), key  # bitwise, in deterministic mode


def _start(root: Path) -> tuple[subprocess.Popen, Path]:
    """Start the finetune stage; return it once its first epoch's checkpoint exists."""
    checkpoint = root / "runs/finetune.live/checkpoint.pt"
    proc = subprocess.Popen(["python", str(REPO / "stages/finetune.py")], cwd=root, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc, checkpoint


def test_ctrl_c_checkpoints_mid_epoch_and_the_rerun_matches(tmp_path, reference, device):
    root = _workspace(tmp_path, device)
    proc, checkpoint = _start(root)
    if device == "cpu":
        time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    steps = STEPS[device]
    assert proc.returncode == 130, stderr
    assert re.fullmatch(rf"reprotune: interrupted in epoch \d after step \d+ of {steps}: checkpoint saved in "
                        r"runs/finetune.live; run the stage again to resume", stderr.strip().splitlines()[-1])
    saved = torch.load(checkpoint, weights_only=True)
    assert 0 < saved["run"]["paused"]["step"] < steps and not (root / "models/model.pt").exists()
    assert "resuming" in _finetune(root).stdout
    _same_weights(reference, root)


def test_a_killed_run_resumes_to_the_same_weights_metrics_and_log(tmp_path, reference, device):
    resumed = _workspace(tmp_path / "killed", device)
    proc, checkpoint = _start(resumed)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(checkpoint, weights_only=True)["run"]["epoch"]
    assert 1 <= killed_at < EPOCHS and not (resumed / "models/model.pt").exists()

    out = _finetune(resumed).stdout
    assert f"resuming after epoch {killed_at}" in out
    assert not (resumed / "runs/finetune.live").exists()  # cleaned up once published

    _same_weights(reference, resumed)

    timing = ["seconds", "images_per_second", "achieved_tflops", "peak_rss_mb"]
    history = [pd.read_csv(root / "metrics/train_history.csv").drop(columns=timing) for root in (reference, resumed)]
    pd.testing.assert_frame_equal(*history)
    # train_seconds counts both sessions' training: the sum of every epoch's seconds, the killed
    # session's epochs included (a rerun that restarted the count would report only its own)
    seconds = pd.read_csv(resumed / "metrics/train_history.csv")["seconds"]
    metrics = json.loads((resumed / "metrics/train.json").read_text())
    assert metrics["train_seconds"] == pytest.approx(seconds.sum(), rel=1e-9)
    assert metrics["train_seconds"] > seconds.iloc[killed_at:].sum()

    logs = []
    for root in (reference, resumed):
        acc = EventAccumulator(str(root / "runs/finetune"), size_guidance={"scalars": 0})
        acc.Reload()
        logs.append({tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in ("train/loss", "val/acc")})
    assert logs[0] == logs[1]  # every step once, same values: the log continued cleanly
    assert [step for step, _ in logs[1]["val/acc"]] == [STEPS[device] * e for e in range(1, EPOCHS + 1)]


def test_changed_params_start_fresh_instead_of_resuming(tmp_path):
    root = _workspace(tmp_path)
    stale = root / "runs/finetune.live"
    stale.mkdir(parents=True)
    (stale / "key").write_text("some other run")
    (stale / "checkpoint.pt").write_bytes(b"not a checkpoint")
    set_params(root / "params.yaml", {"train.epochs": 1})
    out = _finetune(root).stdout
    assert "resuming" not in out and (root / "models/model.pt").exists()
