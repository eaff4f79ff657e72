"""Seed spread: a seed sweep through the real DVC queue, grouped by every param but `seed`.

The project is not the pipeline but a one-stage stand-in whose metrics are exact functions of
`seed` and `train.lr` (seconds instead of minutes); DVC, its queue, its hydra sweep syntax and its
`dvc exp show --json` are the real ones.
"""

from __future__ import annotations

import json
import math
import re
import time

import pytest
import yaml

from fixtures import run
from reprotune.tracking.review import exp_show_runs, seed_groups, seed_table

pytestmark = pytest.mark.dvc  # every test here reads the one sweep through the real DVC queue

N_TEST = 400  # test images: one is 0.0025 of test_acc

# 3 more test images right per seed, 40 more per 0.1 of lr; compress.json's test_acc has a much
# smaller spread (0.001 per seed), so mixing it into evaluate's would show.
STAGE = f"""\
import json, yaml
p = yaml.safe_load(open("params.yaml")); seed, lr = p["seed"], p["train"]["lr"]
json.dump({{"best_val_acc": 0.5 + lr + seed / 100}}, open("metrics/train.json", "w"))
right = 200 + round(lr * {N_TEST}) + 3 * seed
json.dump({{"test_acc": right / {N_TEST}, "macro_f1": 0.3 + seed / 200}}, open("metrics/evaluate.json", "w"))
json.dump({{"test_acc": 0.1 + seed / 1000}}, open("metrics/compress.json", "w"))
json.dump({{"test_images": {N_TEST}}}, open("metrics/preprocess.json", "w"))
"""
DVC_YAML = {"stages": {"fake": {
    "cmd": "python stage.py", "deps": ["stage.py"], "params": ["seed", "train"],
    "outs": [{"metrics/preprocess.json": {"cache": False}}],  # an output, not a metric, as in the pipeline
    "metrics": [{f"metrics/{name}.json": {"cache": False}} for name in ("train", "evaluate", "compress")]}}}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A committed baseline (seed 0, lr 0.1), the queued seed sweep over seeds 0-2 of
    docs/how-to/share-with-a-team.md (seed 0 a rerun of the baseline), then lr 0.2 with seed 3 and,
    differing only in its seed, seed 4: the workspace holds the last."""
    root = tmp_path_factory.mktemp("seeds")
    (root / "metrics").mkdir()
    (root / "metrics" / ".gitkeep").touch()
    (root / "stage.py").write_text(STAGE)
    (root / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "train": {"lr": 0.1}}))
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "repro", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "baseline"], root)
    queued = run(["dvc", "exp", "run", "--queue", "-S", "seed=0,1,2"], root).stdout  # DVC's hydra sweep syntax
    assert queued.count("Queued experiment") == 3, queued
    run(["dvc", "queue", "start", "-j", "2"], root)
    try:
        deadline = time.monotonic() + 120
        while re.search(r"\b(Queued|Running)\b", status := run(["dvc", "queue", "status"], root).stdout):
            assert time.monotonic() < deadline, status
            time.sleep(1)
    finally:
        run(["dvc", "queue", "stop"], root, check=False)
    assert len(re.findall(r"\bSuccess\b", status)) == 3, status
    run(["dvc", "exp", "run", "-q", "-n", "lr0.2-seed3", "-S", "seed=3", "-S", "train.lr=0.2"], root)
    run(["dvc", "exp", "run", "-q", "-n", "lr0.2-seed4", "-S", "seed=4"], root)  # lr 0.2 stays in params.yaml
    return root, json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)


def by_lr(groups) -> dict:
    return {group.params["train.lr"]: group for group in groups}


def test_groups_separate_by_lr_and_count_each_seed_once(sweep):
    _, shown = sweep
    groups = by_lr(seed_groups(exp_show_runs(shown)))
    assert set(groups) == {0.1, 0.2}
    # The baseline reran as a queued experiment, and the workspace holds lr0.2-seed4: each seed once.
    assert groups[0.1].seeds == [0, 1, 2] and "main" not in groups[0.1].names
    assert groups[0.2].seeds == [3, 4] and groups[0.2].names == ["lr0.2-seed3", "lr0.2-seed4"]
    assert all(group.params == {"train.lr": lr} for lr, group in groups.items())


def test_mean_and_sample_std_are_the_expected_numbers(sweep):
    _, shown = sweep
    low, high = (by_lr(seed_groups(exp_show_runs(shown)))[lr].spread for lr in (0.1, 0.2))
    exact = pytest.approx  # float sums: equal to 1e-12
    # lr 0.1, seeds 0-2: 240, 243, 246 of 400 right.
    assert low["test_acc"].n == 3
    assert (low["test_acc"].mean, low["test_acc"].std) == (exact(243 / N_TEST), exact(3 / N_TEST))
    assert (low["test_acc"].min, low["test_acc"].max) == (exact(240 / N_TEST), exact(246 / N_TEST))
    assert (low["best_val_acc"].mean, low["best_val_acc"].std) == (exact(0.61), exact(0.01))
    assert (low["macro_f1"].mean, low["macro_f1"].std) == (exact(0.305), exact(0.005))
    # lr 0.2, seeds 3 and 4: 289 and 292 right; the sample std of two values is their gap / sqrt(2).
    assert high["test_acc"].n == 2
    assert high["test_acc"].mean == exact(290.5 / N_TEST)
    assert high["test_acc"].std == exact(3 / math.sqrt(2) / N_TEST)
    # compress.json's test_acc is its own column, not evaluate's.
    assert (low["compressed test_acc"].mean, low["compressed test_acc"].std) == (exact(0.101), exact(0.001))
    assert (high["compressed test_acc"].mean, high["compressed test_acc"].std) == (exact(0.1035),
                                                                                   exact(0.001 / math.sqrt(2)))


def test_unfinished_experiments_and_single_seeds_are_left_out(sweep):
    shown = json.loads(json.dumps(sweep[1]))  # a copy: the other tests read the real one
    baseline = next(entry for entry in shown if entry["rev"] != "workspace")
    done = baseline["experiments"][0]
    # A queued experiment still shows its params; a running one its baseline's metric files.
    for state in ("queued", "running", "failed"):
        ghost = json.loads(json.dumps(done))
        ghost["executor"] = {"state": state}
        ghost["revs"][0]["data"]["params"]["params.yaml"]["data"]["seed"] = 99
        baseline["experiments"].append(ghost)
    single = json.loads(json.dumps(done))
    single["revs"][0]["name"] = "lr0.3"
    single["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]["lr"] = 0.3
    baseline["experiments"].append(single)
    runs = exp_show_runs(shown)
    groups = by_lr(seed_groups(runs))
    assert set(groups) == {0.1, 0.2} and 99 not in groups[0.1].seeds + groups[0.2].seeds
    assert "Not shown: 1 set of params run with one seed only." in seed_table(list(groups.values()), runs, None)


def test_the_cli_prints_mean_and_std_per_group(sweep):
    root, _ = sweep
    out = run(["reprotune", "experiments", "--seeds"], root).stdout
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if re.match(r"\| 0\.[12] ", line)}
    header = "| `train.lr` | n | seeds | best_val_acc | test_acc | macro_f1 | compressed test_acc |"
    assert out.splitlines()[0] == header
    assert "| 3 | 0, 1, 2 | 0.6100 ± 0.0100 | 0.6075 ± 0.0075 | 0.3050 ± 0.0050 | 0.1010 ± 0.0010 |" in rows["0.1"]
    assert "| 2 | 3, 4 |" in rows["0.2"]
    assert list(rows) == ["0.2", "0.1"]  # best test accuracy first
    assert "Test set: 400 images (metrics/preprocess.json), so one image is 0.0025 of test_acc (0.25 points)." in out


def test_the_table_keeps_test_acc_and_names_the_compressed_models_when_both_files_have_one(sweep):
    # Two files with a `test_acc`: `dvc exp show` names its columns `metrics/evaluate.json:test_acc`
    # and `metrics/compress.json:test_acc`; the table shows both, each under its own name.
    root, _ = sweep
    out = run(["reprotune", "experiments"], root).stdout  # no terminal: 120 columns
    lines = out.splitlines()
    assert lines[0].split()[:7] == ["Experiment", "best_val_acc", "test_acc", "macro_f1", "compressed", "test_acc",
                                    "img/s"], out
    assert max(len(line) for line in lines) <= 120
    rows = {line.split()[0].lstrip("└"): line.split() for line in lines[2:] if line[:1] not in (" ", "")}
    rows |= {line.split()[1]: line.split()[1:] for line in lines[2:] if line.startswith("└ ")}
    # lr 0.2, seed 3: 200 + 80 + 9 = 289 of 400 right; its compressed model 0.103
    assert rows["lr0.2-seed3"][1:5] == ["0.7300", "0.7225", "0.3150", "0.1030"], out
    assert rows["lr0.2-seed3"][6:] == ["seed=3", "train.lr=0.2"], out
    assert rows["main"][1:5] == ["0.6000", "0.6000", "0.3000", "0.1000"] and rows["main"][-1] == "(baseline)", out


def test_the_table_wraps_the_params_a_run_changed_and_cuts_nothing():
    from reprotune.tracking.review import experiments_table

    params = {"seed": 0, "train": {"lr": 0.1}, "compress": {"ratio": 0.0}}

    def rev(name, params, acc, compressed=None):
        metrics = {"metrics/evaluate.json": {"data": {"test_acc": acc}}}
        if compressed is not None:
            metrics["metrics/compress.json"] = {"data": {"test_acc": compressed}}
        return {"rev": name, "name": name, "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics}}

    many = json.loads(json.dumps(params)) | {"data": {f"key{i}": "x" * 20 for i in range(12)}}
    pruned = json.loads(json.dumps(params)) | {"compress": {"ratio": 0.3}}
    head = rev("main", params, 0.5) | {"experiments": [
        {"executor": None, "revs": [rev("wide", many, 0.6)]},
        {"executor": None, "revs": [rev("pruned", pruned, 0.5, 0.45)]},
        {"executor": {"state": "queued"}, "revs": [rev("later", params, 0.0)]}]}
    lines = experiments_table([rev("workspace", params, 0.5), head], width=120)
    assert max(len(line) for line in lines) <= 120 and len(lines) > 8  # wrapped, not widened
    text = " ".join(lines)
    assert all(f"data.key{i}={'x' * 20}" in text for i in range(12))  # every change, none cut
    pruned_row = next(line for line in lines if line.startswith("└ pruned")).split()
    assert (pruned_row[3], pruned_row[5]) == ("0.5000", "0.4500") and pruned_row[-1] == "compress.ratio=0.3"
    assert lines[-1] == "Not shown: 1 queued (`dvc exp show` lists them)."


def test_the_review_shows_the_spread_when_the_workspace_has_other_seeds(sweep):
    root, _ = sweep
    report = run(["reprotune", "review", "HEAD"], root).stdout
    assert "### Seed spread" in report and "0.6075 ± 0.0075" in report
