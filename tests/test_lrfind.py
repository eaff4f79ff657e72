"""`reprotune lr-find`: the suggestion rules on hand-made curves, then the command on tiny data: its
outputs, its errors, and whether its suggestion trains."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys

import numpy as np
import PIL.Image
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fixtures import synthetic_splits
from reprotune.cli import app
from reprotune.config import Params
from reprotune.data.splits import save_split
from reprotune.training import lrfind
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.loop import finetune

STEPS = 40  # the fixture's sweep: 1e-4 to 10, 8 steps a decade
# Tiny and from scratch: ResNet18 with random weights, 32 px synthetic images, batch 32 on the CPU
# (a step costs about the same at 16 and at 32 images here: fewer, larger steps are the cheaper test).
TINY = {"model": {"weights": "none"}, "log": {"graph": False, "images": 0, "histograms": False},
        "train": {"batch_size": 32, "epochs": 2, "hflip": False, "device": "cpu"}}


def _curve(points: dict[float, float], lrs: np.ndarray) -> list[float]:
    """A loss curve through (log10 lr, loss) `points`, piecewise linear in log lr."""
    x, y = zip(*sorted(points.items()), strict=True)
    return list(np.interp(np.log10(lrs), x, y))


def test_steepest_descent_is_before_the_minimum_and_min_loss_backs_off_a_decade():
    lrs = np.logspace(-6, 1, 71)  # 10 points a decade
    # Flat, then falling slowly (1e-4..1e-3), fastest between 1e-2 and 10^-1.5, slower to the minimum
    # at 1e-1; then up, and a steeper fall after the minimum (a spike settling), which is no guide.
    loss = _curve({-6: 2.3, -4: 2.3, -3: 2.2, -2: 2.0, -1.5: 1.0, -1: 0.8, -0.5: 3.0, -0.3: 1.2, 1: 3.0}, lrs)
    s = lrfind.suggest(list(lrs), loss)
    assert s.min_loss_lr == pytest.approx(0.1)
    assert s.minimum == pytest.approx(0.01)
    assert 10 ** -2 <= s.steepest <= 10 ** -1.5  # np.gradient's central differences: either end of the fall
    assert s.lr == (s.steepest if lrfind.RULE == "steepest" else s.minimum)
    assert lrfind.suggest(list(lrs), loss, rule="minimum").lr == s.minimum
    assert lrfind.suggest(list(lrs), loss, rule="steepest").lr == s.steepest


def test_the_first_points_are_skipped_and_a_loss_that_never_falls_gives_no_suggestion():
    lrs = np.logspace(-6, 1, 71)
    # A plunge in the first points (the smoothed loss is mostly noise there), a gentle fall later.
    loss = _curve({-6: 5.0, -5.8: 2.3, -3: 2.2, -1: 1.5, 0: 4.0, 1: 6.0}, lrs)
    assert lrfind.suggest(list(lrs), loss, skip=7).steepest > 1e-5
    assert lrfind.suggest(list(lrs), loss, skip=0).steepest < 1e-5
    rising = _curve({-6: 2.3, 1: 9.0}, lrs)
    s = lrfind.suggest(list(lrs), rising, skip=7)
    assert s.lr is None and s.steepest is None and s.minimum is None


@pytest.fixture(scope="module")
def splits():
    return synthetic_splits(480, 40, 0.25)


def _lr_find(root, *args: str) -> tuple[int, str, str]:
    """`reprotune lr-find ARGS` in `root`, in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(root)
        mp.setattr(sys, "argv", ["reprotune", "lr-find", *args])
        try:
            app()
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def project(splits, tmp_path_factory):
    """A project with processed splits, after one `reprotune lr-find`: (root, exit code, stdout, stderr)."""
    root = tmp_path_factory.mktemp("lrfind")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    (root / "data/processed").mkdir(parents=True)
    save_split(splits["train"], root / "data/processed/train.pt")
    return root, *_lr_find(root, "--steps", str(STEPS), "--start-lr", "1e-4", "--end-lr", "10")


def test_lr_find_prints_a_suggestion_and_writes_a_plot_a_record_and_a_tensorboard_run(project):
    root, code, stdout, stderr = project
    assert code == 0, stderr
    record = json.loads((root / "runs/lr-find/lr_find.json").read_text())
    lr = record["suggested_lr"]
    assert stdout.splitlines()[0].startswith(f"suggested train.lr: {lr:.3g} (")
    assert f"dvc exp run -S train.lr={lr:.3g}" in stdout
    assert record["lrs"][0] == pytest.approx(1e-4) and len(record["losses"]) == len(record["lrs"]) > STEPS // 2
    with PIL.Image.open(root / "runs/lr-find/lr_find.png") as png:
        assert png.format == "PNG" and png.width > 300
    events = EventAccumulator(str(root / "runs/lr-find"))
    events.Reload()
    assert {"lr_find/loss", "lr_find/smoothed_loss", "lr_find/lr"} <= set(events.Tags()["scalars"])
    logged = events.Scalars("lr_find/lr")
    assert [e.step for e in logged] == list(range(len(record["lrs"])))
    assert [e.value for e in logged] == pytest.approx(record["lrs"], rel=1e-6)
    assert [e.value for e in events.Scalars("lr_find/loss")] == pytest.approx(record["losses"], rel=1e-6)
    assert sorted(p.name for p in root.iterdir()) == ["data", "params.yaml", "runs"]  # nothing else written
    assert yaml.safe_load((root / "params.yaml").read_text()) == TINY


def test_the_suggested_lr_trains_and_far_larger_or_smaller_ones_do_worse(project, splits, tmp_path):
    root, code, _, stderr = project
    assert code == 0, stderr
    suggested = json.loads((root / "runs/lr-find/lr_find.json").read_text())["suggested_lr"]

    def best_val_acc(lr: float) -> float:
        params = Params.model_validate({**TINY, "train": {**TINY["train"], "lr": lr}})
        return finetune(params, splits["train"], splits["val"], Checkpoints(tmp_path / f"{lr:g}", "x")) \
            .metrics["best_val_acc"]

    good, high, low = best_val_acc(suggested), best_val_acc(100 * suggested), best_val_acc(suggested / 1000)
    assert good >= 0.25, (suggested, good)  # 10 classes: chance is 0.1
    assert high < good - 0.05 and low < good - 0.05, (suggested, good, high, low)


def test_without_processed_data_it_says_which_stage_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    code, stdout, stderr = _lr_find(tmp_path)
    assert code == 1 and stdout == ""
    assert stderr.splitlines() == ["reprotune: error: data/processed/train.pt not found: the LR range test trains "
                                   "on the processed splits; run `dvc repro preprocess` first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_it_will_not_replace_a_folder_it_did_not_write(project, tmp_path):
    root, *_ = project
    (tmp_path / "keep.txt").write_text("mine")
    code, _, stderr = _lr_find(root, "--out", str(tmp_path), "--steps", "5")
    assert code == 1 and "not an lr-find output folder" in stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    code, _, stderr = _lr_find(root, "--start-lr", "1", "--end-lr", "0.1")
    assert code == 2 and stderr.strip() == "reprotune: error: --start-lr (1) must be positive and below --end-lr (0.1)"


def test_the_ramp_is_exponential_and_a_diverging_sweep_stops_early(splits):
    # No clipping and LRs up to 1e6: the loss blows up within a few steps of lr 1.
    params = Params.model_validate({**TINY, "train": {**TINY["train"], "grad_clip": 0}})
    result = lrfind.sweep(params, splits["train"], 30, 1e-2, 1e6)
    assert result.stopped.startswith("diverged") and 2 <= len(result.lrs) < 30
    assert result.lrs == pytest.approx([lrfind.lr_at(i, 30, 1e-2, 1e6) for i in range(len(result.lrs))], rel=1e-9)
    assert all(math.isfinite(x) for x in result.losses + result.smoothed)
    assert result.smoothed[0] == pytest.approx(result.losses[0])  # bias-corrected: no start at 0


@pytest.mark.gpu
def test_the_sweep_runs_on_cuda_with_fp16_and_the_grad_scaler(splits):
    params = Params.model_validate({**TINY, "train": {**TINY["train"], "device": "cuda", "amp": "auto"}})
    result = lrfind.sweep(params, splits["train"], STEPS, 1e-4, 10)
    assert result.device.startswith("cuda") and result.autocast == "float16"
    assert len(result.lrs) > STEPS // 2 and all(math.isfinite(x) for x in result.losses)
    assert lrfind.suggestion_of(result).lr is not None
