"""`reprotune review`: what a pull request changed, and nothing it did not: timing noise is shown apart,
as speed, and a real change in quality still shows."""

from __future__ import annotations

import json
import shutil

import pytest

from fixtures import run
from reprotune.tracking.review import SPEED_NOISE, _metrics_section, _speed_section


def _section(report: str, title: str) -> str:
    """The Markdown of one `### title` section of the report."""
    return report.split(f"### {title}", 1)[1].split("\n### ", 1)[0]


def _scale(path, factors: dict[str, float]) -> None:
    """Multiply dotted keys of a metrics file by their factors."""
    metrics = json.loads(path.read_text())
    for dotted, factor in factors.items():
        *parents, leaf = dotted.split(".")
        node = metrics
        for key in parents:
            node = node[key]
        node[leaf] = node[leaf] * factor
    path.write_text(json.dumps(metrics))


@pytest.fixture
def reviewed(pipeline, tmp_path):
    """A copy of the tiny pipeline with its results committed: the review's base."""
    root = tmp_path / "project"
    shutil.copytree(pipeline, root, symlinks=True)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "baseline results"], root)
    return root


def test_timing_noise_is_not_a_change_and_an_accuracy_change_is(reviewed):
    root = reviewed
    # A rerun on a busier machine: every timing moves, nothing else does.
    _scale(root / "metrics/export.json", {"onnx.latency_ms": 1.8, "torchscript.latency_ms": 0.6,
                                          "onnx_int8.latency_ms": 1.3, "onnx_int8.speedup": 1 / 1.3})
    _scale(root / "metrics/train.json", {"images_per_second": 0.7, "train_seconds": 1.4, "achieved_tflops": 0.7})
    report = run(["reprotune", "review", "HEAD"], root).stdout
    metrics, speed = _section(report, "Metrics"), _section(report, "Speed (machine-dependent)")
    assert "Other metrics that changed" not in metrics, metrics
    assert "latency" not in metrics and "images_per_second" not in metrics, metrics
    rows = [line.split("|") for line in metrics.splitlines() if line.startswith("| `")]
    assert rows and all(cells[4].strip() in ("0", "-") for cells in rows), metrics  # no headline moved
    assert "| `images_per_second` |" in speed and "0.70x (noise)" in speed, speed
    assert "6 other timing figures moved less than" in speed, speed

    # A real change: accuracy, and a latency beyond the noise.
    _scale(root / "metrics/evaluate.json", {"test_acc": 0.5, "test_loss": 2.0})
    _scale(root / "metrics/export.json", {"onnx.latency_ms": 2 * SPEED_NOISE / 1.8})
    report = run(["reprotune", "review", "HEAD"], root).stdout
    metrics, speed = _section(report, "Metrics"), _section(report, "Speed (machine-dependent)")
    test_acc = next(line for line in metrics.splitlines() if line.startswith("| `test_acc` |"))
    assert float(test_acc.split("|")[4]) < 0, test_acc
    assert "| `evaluate: test_loss` |" in metrics, metrics
    assert "| `export: onnx.latency_ms` |" in speed and f"{2 * SPEED_NOISE:.2f}x |" in speed, speed


def test_other_changes_are_listed_by_stage_then_key():
    diff = {"metrics/export.json": {"onnx.test_acc": {"old": 0.5, "new": 0.6, "diff": 0.1},
                                    "int8_agree": {"old": 0.9, "new": 0.8, "diff": -0.1}},
            "metrics/evaluate.json": {"test_top5_acc": {"old": 0.9, "new": 0.95, "diff": 0.05},
                                      "ece": {"old": 0.1, "new": 0.2, "diff": 0.1}},
            "metrics/train.json": {"final_val_loss": {"old": 1.0, "new": 0.9, "diff": -0.1},
                                   "best_epoch": {"old": 1, "new": 2, "diff": 1}}}
    lines = _metrics_section(diff, "main")
    listed = [line.split("`")[1] for line in lines[lines.index("<details><summary>Other metrics that changed "
                                                                "(by stage, then key)</summary>"):]
              if line.startswith("| `")]
    assert listed == ["train: best_epoch", "train: final_val_loss", "evaluate: ece", "evaluate: test_top5_acc",
                      "export: onnx.test_acc"]
    speed = _speed_section({"metrics/train.json": {"images_per_second": {"old": 500.0, "new": 1500.0}}}, "main")
    assert any(line.startswith("| `images_per_second` | 500 | 1500 | 3.00x |") for line in speed), speed
