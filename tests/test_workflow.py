"""The newcomer's path, run as the docs write it: demo -> experiments -> review -> share.

A fresh project with the shipped params (the real CIFAR-10 job) runs `reprotune demo` (what
`make demo` runs after installing), then the docs' own command blocks, taken from README.md and
docs/**/*.md (each follows a `<!-- workflow: NAME -->` marker, found exactly once; the first hour's
are in docs/tutorial/first-hour.md) and run with bash in order. The only changes made to them: a
temporary directory for the shared cache, a local bare repository as `origin`, and no `make install`
or venv activation (the tests already run inside the environment).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from fixtures import REPO, env, free_port, make_project, run

pytestmark = pytest.mark.dvc  # the demo and the docs' commands: dvc repro, exp, push, pull

CACHED = ["data/raw/download/cifar-10-python.tar.gz", "data/processed/train.pt", "data/processed/test.pt",
          "models/model.pt", "models/model.onnx", "models/int8/model.int8.onnx", "models/model.torchscript.pt"]
STAGES = ["download", "preprocess", "finetune", "evaluate", "export"]


DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def doc_block(name: str) -> str:
    """The fenced bash block after `<!-- workflow: NAME -->`, in README.md or docs/ (exactly once)."""
    pattern = re.compile(rf"<!-- workflow: {re.escape(name)} -->\s*```bash\n(.*?)```", re.S)
    found = [(path, match.group(1)) for path in DOCS for match in pattern.finditer(path.read_text())]
    where = [str(path.relative_to(REPO)) for path, _ in found]
    assert len(found) == 1, f"workflow: {name} should mark one block in README.md or docs/; found in {where}"
    return found[0][1]


def run_block(name: str, cwd: Path, substitutions: dict[str, str] | None = None,
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a docs block with bash (stopping at the first failing command), as the docs say."""
    script = doc_block(name)
    for old, new in {"make install && ": "", "source .venv/bin/activate && ": "", **(substitutions or {})}.items():
        script = script.replace(old, new)
    return run(["bash", "-euo", "pipefail", "-c", script], cwd, extra_env=extra_env)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A fresh project with the shipped (real-job) params after `reprotune demo`."""
    root = make_project(tmp_path_factory.mktemp("newcomer") / "project")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    run(["git", "commit", "-qam", "shipped params"], root)
    proc = run(["reprotune", "demo"], root, timeout=900)
    assert "$ dvc exp run -n demo -S data.dataset=synthetic" in proc.stdout
    # No warning about outputs a first run has no hash for yet (DVC's checkout of a lockless baseline).
    assert "No file hash info" not in proc.stdout + proc.stderr, proc.stderr[:2000]
    return root


def test_the_demo_leaves_params_where_experiments_build_on_them(demo):
    evaluate = json.loads((demo / "metrics/evaluate.json").read_text())
    assert evaluate["test_acc"] > 0.5  # 10 classes: chance is 0.1
    for stage in STAGES:
        assert list((demo / "runs" / stage).glob("events.out.tfevents.*")), stage
    # params.yaml holds the demo's settings (comments kept), so dvc.lock and params agree
    params = (demo / "params.yaml").read_text()
    assert "dataset: synthetic" in params and "# cifar10 | cifar100 | imagenette | folder" in params
    # DVC rewrote params.yaml: only the demo's keys changed, nothing else in the file's spelling.
    diff = run(["git", "diff", "-U0", "params.yaml"], demo).stdout
    changed = {line[1:].split(":")[0].strip() for line in diff.splitlines() if line[:1] in "+-"
               and not line.startswith(("+++", "---"))}
    assert changed == {"dataset", "synthetic_train", "synthetic_test", "weights", "epochs", "batch_size", "lr"}, diff
    assert run(["dvc", "status"], demo).stdout.strip() == "Data and pipelines are up to date."


def test_baseline_share_experiment_review_and_a_teammate_as_the_docs_say(demo, tmp_path):
    # 1. The demo becomes the committed baseline, shared through a DVC remote and a git remote.
    remote, origin = tmp_path / "cache", tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    run(["git", "remote", "add", "origin", str(origin)], demo)
    run_block("baseline", demo)
    run_block("share", demo, {"/mnt/team/reprotune-cache": str(remote)})
    run(["git", "push", "-q", "origin", "main"], demo)
    assert any(remote.rglob("*")), "nothing reached the shared cache"
    baseline = {path: _md5(demo / path) for path in CACHED}

    # 2. An experiment on top of it, offline, and the headline view at 120 columns.
    shown = run_block("experiments", demo, extra_env={"COLUMNS": "120"}).stdout
    table = shown.splitlines()[next(i for i, line in enumerate(shown.splitlines()) if line.startswith("Experiment  ")):]
    assert table[0].split() == ["Experiment", "best_val_acc", "test_acc", "macro_f1", "img/s", "params", "changed",
                                "(against", "main)"], "\n".join(table)
    assert max(len(line) for line in table) <= 120
    rows = [line.split() for line in table[2:] if line.strip()]
    assert [row[0] for row in rows][:2] == ["workspace", "main"], rows
    assert rows[1][-1] == "(baseline)" and rows[2][:2] == ["└", "lr-0.01"] and rows[2][-1] == "train.lr=0.01", rows
    assert rows[0][-1] == "train.lr=0.01", rows  # the workspace holds the last experiment's params
    assert all(re.fullmatch(r"0\.\d{4}", row[2]) for row in rows[:2]), rows  # test_acc, to 4 places

    # 3. Review against the baseline: params, headline metrics first, the plots that changed.
    report = run_block("review", demo).stdout
    assert "| `train.lr` | 0.05 | 0.01 |" in report
    metrics = report[report.index("### Metrics"):report.index("### Speed (machine-dependent)")]
    assert re.findall(r"^\| `(\w+)`", metrics, re.M)[:5] == [
        "best_val_acc", "test_acc", "macro_f1", "parity", "int8_agree"]
    speed = report[report.index("### Speed (machine-dependent)"):report.index("### Plots")]
    assert re.findall(r"^\| `(\w+)`", speed, re.M)[:1] == ["images_per_second"]
    assert re.search(r"Changed: .*\bLoss\b", report) and (demo / "dvc_plots/index.html").is_file()

    # 4. A teammate's fresh clone gets the baseline back and has nothing to rebuild.
    teammate = tmp_path / "teammate"
    run_block("clone", tmp_path, {"<repo>": str(origin), "cd reprotune": f"cd {teammate}",
                                  "reprotune &&": f"{teammate} &&"})
    for path, md5 in baseline.items():
        assert _md5(teammate / path) == md5, path
    assert json.loads(run(["dvc", "status", "--json"], teammate).stdout) == {}
    assert "Running stage" not in run(["dvc", "repro"], teammate).stdout

    # 5. The experiments shared without commits: git refs through origin, outputs through the remote.
    run_block("exp-push", demo)
    run_block("exp-pull", teammate)
    pulled = run(["dvc", "exp", "list", "--all-commits", "--name-only"], teammate).stdout.split()
    assert {"demo", "lr-0.01"} <= set(pulled), pulled
    run(["dvc", "exp", "apply", "lr-0.01"], teammate)
    run(["dvc", "checkout"], teammate)
    assert _md5(teammate / "models/model.pt") == _md5(demo / "models/model.pt")  # the experiment's own model


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_shows_every_experiment_without_touching_the_workspace(demo):
    run(["dvc", "exp", "run", "-S", "train.epochs=1", "-n", "one-epoch", "finetune"], demo)
    before = {p: _md5(p) for p in (demo / "runs").rglob("*") if p.is_file()}
    port = free_port()
    server = subprocess.Popen(["reprotune", "tensorboard", "--port", str(port)], cwd=demo, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/data"
    try:
        deadline, runs = time.monotonic() + 120, []
        while time.monotonic() < deadline and not {"demo/finetune", "one-epoch/finetune"} <= set(runs):
            time.sleep(0.5)
            with contextlib.suppress(OSError):
                runs = _get(f"{base}/runs")
        assert {"workspace/finetune", "demo/finetune", "one-epoch/finetune", "demo/evaluate"} <= set(runs), runs
        while time.monotonic() < deadline:
            tags = _get(f"{base}/plugin/scalars/tags")
            if all("val/acc" in tags.get(f"{name}/finetune", {}) for name in ("demo", "one-epoch")):
                break
            time.sleep(0.5)
        request = urllib.request.Request(f"{base}/plugin/hparams/experiment", data=b'{"experimentName": ""}',
                                         headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
        with urllib.request.urlopen(request, timeout=10) as response:
            experiment = json.loads(response.read())
        assert "train.epochs" in {info["name"] for info in experiment["hparamInfos"]}
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert server.returncode == 0, out
    notice = "TensorFlow installation not found - running"  # TensorBoard's own, which no option turns off
    if notice in out:
        assert "notice is expected" in out.split(notice)[0], out  # said before it appears
    assert {p: _md5(p) for p in (demo / "runs").rglob("*") if p.is_file()} == before
