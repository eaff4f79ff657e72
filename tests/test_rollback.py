"""A rejected params value loses nothing: after a failed `dvc exp run -S` or `dvc repro`, the workspace
is byte for byte what it was before the command (reprotune.rollback)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fixtures import REPO, env, run, set_params
from reprotune.rollback import _revert_keys, _text_before


def snapshot(root: Path) -> dict[str, str]:
    """Every file of the workspace (not git's or DVC's own stores) and its content's hash."""
    skip = {".git", ".dvc/cache", ".dvc/tmp"}
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))
            if path.is_file() and not any(str(path.relative_to(root)).startswith(s) for s in skip)}


@pytest.fixture(scope="module")
def committed(pipeline, tmp_path_factory) -> Path:
    """A copy of the reproduced pipeline with everything committed: a clean `git status`."""
    root = tmp_path_factory.mktemp("rollback") / "project"
    shutil.copytree(pipeline, root, symlinks=True)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "reproduced"], root)
    return root


def assert_unchanged(root: Path, before: dict[str, str]) -> None:
    after = snapshot(root)
    assert sorted(set(before) - set(after)) == [], "outputs deleted"
    assert {k for k in before if before[k] != after.get(k)} == set(), "files changed"
    assert sorted(set(after) - set(before)) == [], "files added"
    assert "up to date" in run(["dvc", "status"], root).stdout


@pytest.mark.dvc
@pytest.mark.parametrize("overrides", [["train.lr=abc"], ["train.epochs=1", "train.optimizer=sgdd"]])
def test_a_rejected_set_param_leaves_the_workspace_as_it_was(committed, overrides):
    before = snapshot(committed)
    args = [arg for override in overrides for arg in ("-S", override)]
    proc = run(["dvc", "exp", "run", *args], committed, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("reprotune: error:")]
    assert len(errors) == 1, proc.stderr
    bad = overrides[-1].split("=")[0]
    assert f"params.yaml: {bad}:" in errors[0]
    assert "the workspace is as it was: finetune's outputs restored" in errors[0]
    assert_unchanged(committed, before)
    assert run(["git", "status", "--porcelain"], committed).stdout == ""


@pytest.mark.dvc
def test_outputs_not_yet_committed_come_back_too(pipeline, tmp_path):
    """After `dvc repro` and before a commit, the metrics (kept in git, not in DVC's cache) exist only in
    the workspace: the copies each stage keeps bring them back. As after `make demo`."""
    root = tmp_path / "project"
    shutil.copytree(pipeline, root, symlinks=True)
    assert "metrics/train.json" in run(["git", "status", "--porcelain", "--untracked-files=all"], root).stdout
    before = snapshot(root)
    proc = run(["dvc", "exp", "run", "-S", "train.lr=abc"], root, check=False)
    assert proc.returncode != 0
    assert "(the workspace is as it was: finetune's outputs restored" in proc.stderr, proc.stderr
    assert snapshot(root) == before


@pytest.mark.dvc
def test_a_rejected_set_param_keeps_the_users_own_uncommitted_edits(committed):
    """Not committed (as after `make demo`), so HEAD is not the file as it was, and the user had set the
    very key -S changes: the text comes back from the stash DVC made of the workspace, byte for byte."""
    params = committed / "params.yaml"
    original = params.read_text()
    try:
        set_params(params, {"data.val_fraction": 0.25, "train.lr": 0.07})
        edited = params.read_bytes()
        proc = run(["dvc", "exp", "run", "-S", "train.lr=abc"], committed, check=False)
        assert proc.returncode != 0
        assert "params.yaml as before `dvc exp run -S`" in proc.stderr, proc.stderr
        assert params.read_bytes() == edited  # the user's edits, lr 0.07 included, not HEAD's lr
    finally:
        params.write_text(original)
    assert "up to date" in run(["dvc", "status"], committed).stdout  # and every output is back


@pytest.mark.dvc
def test_a_bad_value_typed_into_params_yaml_deletes_nothing(committed):
    """`dvc repro` with a typo: the first stage to run (download) rejects it and restores its outputs;
    the file keeps the user's text, typo included, for them to fix."""
    params = committed / "params.yaml"
    original = params.read_text()
    try:
        set_params(params, {"data.synthetic_seed": "O"})  # a letter for a digit
        before = snapshot(committed)
        proc = run(["dvc", "repro"], committed, check=False)
        assert proc.returncode != 0
        assert "params.yaml: data.synthetic_seed:" in proc.stderr
        assert "download's outputs restored from the DVC cache" in proc.stderr
        assert snapshot(committed) == before
    finally:
        params.write_text(original)
    assert "up to date" in run(["dvc", "status"], committed).stdout


@pytest.mark.dvc
def test_a_misspelt_tracked_key_stops_dvc_before_it_deletes_anything(committed):
    """A key dvc.yaml tracks, renamed by a typo: DVC itself would report it missing only after deleting
    the stage's outputs; the `meta` guard makes it stop while loading dvc.yaml."""
    params = committed / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("synthetic_seed:", "synthetic_sed:"))
        before = snapshot(committed)
        proc = run(["dvc", "repro"], committed, check=False)
        assert proc.returncode != 0
        assert "Could not find 'data.synthetic_seed'" in proc.stderr
        assert snapshot(committed) == before
    finally:
        params.write_text(original)


def test_every_key_dvc_tracks_one_by_one_is_in_a_guard():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    values = yaml.safe_load((REPO / "params.yaml").read_text())

    def value(key):
        node = values
        for part in key.split("."):
            node = node[part]
        return node

    guarded = set()
    for name, stage in stages.items():
        refs = [ref.removeprefix("${").removesuffix("}") for ref in (stage.get("meta") or {}).get("params", [])]
        tracked = [key for key in stage.get("params", []) if isinstance(key, str)]
        assert set(refs) <= set(tracked), name  # a guard names only what its stage tracks
        guarded |= set(refs)
    # Whole sections need no guard: a typo inside one reaches the stage's own check.
    singles = {key for stage in stages.values() for key in stage.get("params", [])
               if isinstance(key, str) and not isinstance(value(key), dict)}
    assert singles - guarded == set()


# ------------------------------------------------------------------------ the params, without DVC runs

def git_repo(root: Path, text: str) -> Path:
    root.mkdir()
    (root / "params.yaml").write_text(text)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "params"]):
        subprocess.run(["git", *args], cwd=root, env=env(), check=True)
    return root


TEXT = "train:\n  lr: 0.1    # a comment DVC's rewrite drops\n  betas: [0.9, 0.999]\nlog:\n  images: 4\n"


def test_the_text_before_set_param_is_heads_when_applying_it_gives_what_dvc_wrote(tmp_path):
    from dvc.utils.hydra import apply_overrides

    root = git_repo(tmp_path / "repo", TEXT)
    apply_overrides(root / "params.yaml", ["train.lr=abc"])  # what `dvc exp run -S` does
    assert _text_before(root / "params.yaml", "params.yaml", ["train.lr=abc"], root) == TEXT.encode()
    # Another change than the -S one: HEAD's text is not what the file held; None, never HEAD's
    apply_overrides(root / "params.yaml", ["log.images=8"])
    assert _text_before(root / "params.yaml", "params.yaml", ["train.lr=abc"], root) is None


def test_reverting_keys_puts_back_changed_added_and_deleted_keys_only(tmp_path):
    from dvc.utils.hydra import apply_overrides

    root = git_repo(tmp_path / "repo", TEXT)
    path = root / "params.yaml"
    apply_overrides(path, ["log.images=8"])  # the user's own edit, to keep
    overrides = ["train.lr=abc", "+train.extra=1", "+new.section=2", "~train.betas"]
    apply_overrides(path, overrides)
    assert _revert_keys(path, "params.yaml", overrides, root)
    assert yaml.safe_load(path.read_text()) == {"train": {"lr": 0.1, "betas": [0.9, 0.999]}, "log": {"images": 8}}
