"""The front door: `reprotune demo` and how every command fails."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

import reprotune
from fixtures import REPO, run


@pytest.mark.reliability
@pytest.mark.parametrize("args, message", [
    (["--bogus"], "No such option: --bogus"),
    (["predict", "x.png", "--top-k", "0"], "Invalid value for '--top-k': Input should be greater than or equal to 1"),
    (["predict"], "Missing argument 'images'."),
    (["review", "HEAD", "--plots"], "Option '--plots' requires an argument."),
])
def test_command_line_mistakes_are_one_line_like_every_other_failure(tmp_path, args, message):
    proc = run(["reprotune", *args], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"reprotune: error: {message}"]


@pytest.mark.reliability
def test_a_stage_script_with_a_bad_option_is_one_line_too(tmp_path):
    proc = run(["python", str(REPO / "stages/finetune.py"), "--node-rank", "x"], tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "reprotune: error: Invalid value for '--node-rank': Input should be a valid integer, unable to parse "
        "string as an integer"]


def test_version(tmp_path):
    proc = run(["reprotune", "--version"], tmp_path)
    assert proc.stdout.strip() == f"reprotune {reprotune.__version__}"


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
    assert proc.stderr.strip() == ("reprotune: error: data/raw/download/cifar-10-python.tar.gz: archive not found "
                                   "(run the download stage first)")
    proc = run(["python", str(REPO / "stages/evaluate.py")], tmp_path, check=False)
    assert proc.stderr.strip() == "reprotune: error: models/model.pt: reprotune model not found"


@pytest.mark.reliability
def test_experiments_with_a_broken_params_file_says_what_is_wrong_not_a_table(tmp_path):
    # Before DVC is asked: its table of a broken file had thousands of columns and exited 0.
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("  lr: ", "  lrr: ", 1))
    proc = run(["reprotune", "experiments"], tmp_path, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "reprotune: error: params.yaml: unknown key 'train.lrr' (did you mean 'train.lr'?)"]


# The options through which a command writes files: (command, option).
WRITING_OPTIONS = [("monitor", "metrics"), ("monitor", "logdir"), ("lr-find", "out"), ("review", "plots")]


def test_no_command_writes_into_a_stage_output_by_default():
    # An ad-hoc command writing where a stage's output lives makes `dvc status` call the stage modified
    # and a later `dvc checkout` refuse to overwrite it.
    import typer
    import yaml

    from reprotune.cli import cli

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outputs = [PurePosixPath(next(iter(out)) if isinstance(out, dict) else out)
               for stage in stages.values() for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])]
    assert PurePosixPath("metrics/monitor.json") in outputs and PurePosixPath("runs/monitor") in outputs
    commands = typer.main.get_command(cli).commands
    for name, option in WRITING_OPTIONS:
        default = next(p.default for p in commands[name].params if p.name == option)
        if default is None:  # writes only when asked
            continue
        path = PurePosixPath(str(default))
        clash = [str(out) for out in outputs if path == out or out in path.parents or path in out.parents]
        assert clash == [], f"reprotune {name} --{option.replace('_', '-')} defaults to {path}: inside {clash}"


def test_flags_show_as_flags_in_the_help(tmp_path):
    for args in (["--help"], ["monitor", "--help"], ["serve", "--help"], ["review", "--help"]):
        out = run(["reprotune", *args], tmp_path).stdout
        assert "--help" in out and "<bool>" not in out and "BOOLEAN" not in out, (args, out)
    assert "--version  " in run(["reprotune", "--help"], tmp_path).stdout
    assert "--fail-on-drift  " in run(["reprotune", "monitor", "--help"], tmp_path).stdout
