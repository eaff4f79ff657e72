"""The resume key and the checkpoint directory: what makes a rerun resume, and what starts it fresh."""

from __future__ import annotations

import sys

import torch

from reprotune.config import Params
from reprotune.training import checkpoint
from reprotune.training.checkpoint import CHECKPOINT, KEY, Checkpoints, run_key


def _inputs(tmp_path, content: bytes = b"split"):
    path = tmp_path / "train.pt"
    path.write_bytes(content)
    return [path]


def test_the_key_follows_params_data_and_code(tmp_path, monkeypatch):
    params = Params()
    base = run_key(params, _inputs(tmp_path))
    assert run_key(Params(), _inputs(tmp_path)) == base  # the same run: the same key
    assert len(base) == 64 and int(base, 16) >= 0  # a sha256 in hex
    for changed in ({"seed": 1}, {"train": {"lr": 0.02}}, {"model": {"dropout": 0.1}}, {"log": {"images": 4}}):
        assert run_key(Params.model_validate(changed), _inputs(tmp_path)) != base, changed
    # evaluate and export do not shape training: a rerun after changing them still resumes
    assert run_key(Params.model_validate({"evaluate": {"tta": True}, "export": {"opset": 17}}),
                   _inputs(tmp_path)) == base
    assert run_key(params, _inputs(tmp_path, b"other split")) != base
    # the code: every reprotune module this process has loaded, and only those
    module = tmp_path / "reprotune_fake.py"
    module.write_text("x = 1\n")
    fake = type(sys)("reprotune.fake")
    fake.__file__ = str(module)
    monkeypatch.setitem(sys.modules, "reprotune.fake", fake)
    with_module = run_key(params, _inputs(tmp_path))
    assert with_module != base
    module.write_text("x = 2\n")
    assert run_key(params, _inputs(tmp_path)) not in (base, with_module)
    monkeypatch.setitem(sys.modules, "unrelated.module", fake)  # not reprotune's: not in the key
    assert run_key(params, _inputs(tmp_path)) != with_module


def test_a_matching_checkpoint_resumes_and_anything_else_starts_clean(tmp_path, capsys):
    work = tmp_path / "work"
    fresh = Checkpoints(work, "key-a")
    assert fresh.resume() is None and (work / KEY).read_text() == "key-a" and not (work / CHECKPOINT).exists()
    fresh.save({"run": {"epoch": 3}, "weights": torch.ones(2)})
    again = Checkpoints(work, "key-a").resume()
    assert again["run"] == {"epoch": 3} and torch.equal(again["weights"], torch.ones(2)) and again["key"] == "key-a"
    assert capsys.readouterr().out == ""

    (work / "tb").mkdir()
    (work / "tb" / "events").write_text("the old run's log")
    assert Checkpoints(work, "key-b").resume() is None  # other params, data or code: start over
    assert "its checkpoint is of other params, data or code: starting fresh" in capsys.readouterr().out
    assert sorted(p.name for p in work.iterdir()) == [KEY] and (work / KEY).read_text() == "key-b"

    Checkpoints(work, "key-b").save({"run": {"epoch": 1}})
    (work / CHECKPOINT).write_bytes(b"torn")  # killed mid-write by something other than us
    assert Checkpoints(work, "key-b").resume() is None


def test_a_checkpoint_whose_own_key_disagrees_is_not_trusted(tmp_path):
    work = tmp_path / "work"
    Checkpoints(work, "key-a").resume()
    torch.save({"run": {"epoch": 2}, "key": "key-z"}, work / CHECKPOINT)  # the key file says a, the file z
    assert Checkpoints(work, "key-a").resume() is None


def test_remove_forgets_the_run(tmp_path):
    work = tmp_path / "work"
    run = Checkpoints(work, "k")
    run.resume()
    run.save({"run": {}})
    run.remove()
    assert not work.exists()
    assert run.logdir == work / "tb" and checkpoint.CHECKPOINT == "checkpoint.pt"


def test_a_fresh_run_creates_its_directory_with_parents_and_removing_twice_is_fine(tmp_path):
    run = Checkpoints(tmp_path / "runs" / "finetune.live", "k")  # runs/ does not exist yet on a fresh clone
    assert run.resume() is None and (tmp_path / "runs" / "finetune.live" / KEY).is_file()
    run.remove()
    run.remove()
    assert not (tmp_path / "runs" / "finetune.live").exists()


def test_a_torn_checkpoint_says_so_and_starts_fresh(tmp_path, capsys):
    work = tmp_path / "work"
    Checkpoints(work, "k").resume()
    (work / CHECKPOINT).write_bytes(b"torn")
    assert Checkpoints(work, "k").resume() is None
    out = capsys.readouterr().out
    assert "not a readable training checkpoint" in out and out.strip().endswith("starting fresh")
