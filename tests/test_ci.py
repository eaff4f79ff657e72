"""The GitHub Actions workflow that reviews pull requests, checked by actionlint (no CI service runs here)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

from fixtures import REPO, run

WORKFLOW = REPO / ".github/workflows/pull-request.yml"


def test_the_pull_request_workflow_passes_actionlint(tmp_path):
    actionlint = shutil.which("actionlint", path=str(Path(sys.executable).parent))
    assert actionlint, "actionlint is a test dependency (pip install -e '.[test]')"
    proc = run([actionlint, "-no-color", str(WORKFLOW)], tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and actionlint does fail a broken one: an expression injected into a shell, an unknown key
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("run: make install",
                                                   "run: echo ${{ github.event.pull_request.title }}")
                      .replace("timeout-minutes: 30", "timeout-minute: 30"))
    proc = run([actionlint, "-no-color", str(broken)], tmp_path, check=False)
    assert proc.returncode == 1 and "potentially untrusted" in proc.stdout and "timeout-minute" in proc.stdout


def test_the_workflow_runs_the_demo_and_posts_the_review():
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["review"]["steps"]
    commands = "\n".join(step.get("run", "") for step in steps)
    assert "make demo" in commands and 'reprotune review "$BASE" > review.md' in commands
    assert "cml comment create" in commands
