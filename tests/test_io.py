"""Atomic outputs: a failed or killed write keeps the previous output and leaves no torn file."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import REPO, env, run
from reprotune import files
from reprotune.errors import ReprotuneError

pytestmark = pytest.mark.reliability  # every test here is part of the reliability suite


def test_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    files.write_json(target, {"acc": 0.5})

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(ReprotuneError, match=r"metrics.json: cannot write: No space left on device"):
        files.write_json(target, {"acc": 0.9})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"acc": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_failed_directory_write_keeps_the_previous_directory(tmp_path):
    target = tmp_path / "processed"
    with files.atomic_dir(target) as tmp:
        (tmp / "train.pt").write_text("old")
    with pytest.raises(RuntimeError), files.atomic_dir(target) as tmp:
        (tmp / "train.pt").write_text("half")
        raise RuntimeError("killed halfway")
    assert (target / "train.pt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed"]


def test_a_failed_file_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.pt"
    files.write_text(target, "old")
    with pytest.raises(RuntimeError), files.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("failed halfway")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# Writes half an output, says so, then waits to be killed: no `finally` or atexit runs after SIGKILL.
HALF_WRITTEN = """
import sys, time
from pathlib import Path
from reprotune import files
target = Path(sys.argv[2])
with (files.atomic_file if sys.argv[1] == "file" else files.atomic_dir)(target) as tmp:
    (tmp if sys.argv[1] == "file" else tmp / "train.pt").write_text("half")
    print("writing", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_sigkill_mid_write_keeps_the_previous_output_and_the_next_write_clears_up(tmp_path, kind):
    target = tmp_path / "out"
    write = files.atomic_file if kind == "file" else files.atomic_dir
    with write(target) as tmp:
        (tmp if kind == "file" else tmp / "train.pt").write_text("old")
    proc = subprocess.Popen([sys.executable, "-c", HALF_WRITTEN, kind, str(target)], env=env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (target if kind == "file" else target / "train.pt").read_text() == "old"
    with write(target) as tmp:
        (tmp if kind == "file" else tmp / "train.pt").write_text("new")
    assert (target if kind == "file" else target / "train.pt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the killed write's temporary is gone


def test_an_unwritable_output_location_is_one_clear_error(tmp_path):
    blocker = tmp_path / "metrics"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(ReprotuneError, match=r"metrics/train.json: cannot write: .*/metrics is not a directory"):
        files.write_json(blocker / "train.json", {})


def test_temporaries_left_by_a_killed_write_are_cleared_next_time(tmp_path):
    target = tmp_path / "model.pt"
    (tmp_path / ".model.pt.abc123.tmp").write_text("torn")
    (tmp_path / ".processed.xyz.tmp").mkdir()
    files.write_text(target, "whole")
    with files.atomic_dir(tmp_path / "processed"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "processed"]


def test_debug_flag_shows_the_traceback(tmp_path):
    # Every stage takes --debug (run_stage); download starts in half the time finetune takes.
    (tmp_path / "params.yaml").write_text("data: {val_fraction: 2}\n")
    plain = run(["python", str(REPO / "stages/download.py")], tmp_path, check=False)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    debug = run(["python", str(REPO / "stages/download.py"), "--debug"], tmp_path, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "data.val_fraction" in debug.stderr


def test_outputs_get_the_modes_a_plain_write_gets(tmp_path):
    # Temporaries are created owner-only; renamed into place they must not stay so, or a teammate or
    # a TensorBoard service could not read them (DVC's own checkouts give 0666/0777 less the umask).
    previous = os.umask(0o027)
    try:
        files.write_json(tmp_path / "a/metrics.json", {})
        with files.atomic_dir(tmp_path / "runs") as tmp:
            (tmp / "events").write_text("x")
        plain = tmp_path / "plain"
        plain.write_text("")
        assert stat.S_IMODE((tmp_path / "a/metrics.json").stat().st_mode) == 0o640 == stat.S_IMODE(
            plain.stat().st_mode)
        assert stat.S_IMODE((tmp_path / "runs").stat().st_mode) == 0o750
    finally:
        os.umask(previous)
