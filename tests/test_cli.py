"""The front door: `reprotune demo` and how every command fails."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, make_project, run


def test_demo_runs_the_whole_dag_offline_and_leaves_params_unchanged(tmp_path):
    root = make_project(tmp_path / "demo", overrides={})
    # The demo applies its own overrides on top of the shipped (real-job) params.
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    run(["git", "commit", "-qam", "shipped params"], root)
    before = (root / "params.yaml").read_bytes()
    proc = run(["reprotune", "demo"], root, timeout=900)
    assert (root / "params.yaml").read_bytes() == before
    assert "params.yaml is unchanged" in proc.stdout
    evaluate = json.loads((root / "metrics/evaluate.json").read_text())
    assert evaluate["test_acc"] > 0.5  # 10 classes: chance is 0.1
    for stage in ("download", "preprocess", "finetune", "evaluate", "export"):
        assert list((root / "runs" / stage).glob("events.out.tfevents.*")), stage
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    (demo,) = experiments
    params = demo["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert params["data"]["dataset"] == "synthetic" and params["model"]["weights"] == "none"


@pytest.mark.reliability
def test_unexpected_failures_are_one_line_unless_debugging(tmp_path):
    # A params file that is a directory: an OSError nobody anticipated by name.
    (tmp_path / "params.yaml").mkdir()
    proc = run(["python", str(REPO / "stages/evaluate.py")], tmp_path, check=False)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "reprotune: error:" in proc.stderr


@pytest.mark.reliability
def test_missing_inputs_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = run(["python", str(REPO / "stages/preprocess.py")], tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("reprotune: error: data/raw/cifar-10-python.tar.gz: archive not found "
                                   "(run the download stage first)")
    proc = run(["python", str(REPO / "stages/evaluate.py")], tmp_path, check=False)
    assert proc.stderr.strip() == "reprotune: error: models/model.pt: reprotune model not found"
