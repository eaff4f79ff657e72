"""params.yaml validation: the shipped file, and the one-line errors for bad ones."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from fixtures import REPO, run
from reprotune import paramsdoc
from reprotune.config import ExportConfig, Params, TrainConfig, load_params
from reprotune.data.splits import Split
from reprotune.errors import ReprotuneError
from reprotune.tracking.review import PARAM_SECTIONS
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.loop import finetune


def test_shipped_params_are_the_documented_defaults():
    # The config classes' defaults document params.yaml; they must not drift apart.
    assert load_params(REPO / "params.yaml").model_dump() == Params().model_dump()


def test_shipped_params_describe_the_real_job():
    params = load_params(REPO / "params.yaml")
    assert params.data.dataset == "cifar10" and params.data.source == (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
    assert params.model.weights == "imagenet" and params.train.device == "auto"


def _write(tmp_path, params: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.reliability
@pytest.mark.parametrize("params, message", [
    ({"train": {"learning_rate": 0.1}}, r"unknown key 'train.learning_rate' \(did you mean 'train.lr'\?\)"),
    ({"trian": {}}, r"unknown key 'trian' \(did you mean 'train'\?\)"),
    ({"train": {"lr": -1}}, r"train.lr: Input should be greater than 0 \(got -1\)"),
    ({"train": {"batch_size": 0}}, r"train.batch_size: Input should be greater than or equal to 1"),
    ({"train": {"epochs": "many"}}, r"train.epochs: Input should be a valid integer"),
    ({"data": {"val_fraction": 1.5}}, r"data.val_fraction: Input should be less than 1"),
    ({"data": {"md5": "xyz"}}, r"data.md5: must be 32 hexadecimal digits"),
    ({"train": {"device": "gpu"}}, r"train.device: must be auto, cpu, cuda or cuda:N"),
    ({"train": {"optimizer": "lbfgs"}}, r"train.optimizer: Input should be 'sgd', 'adam', 'adamw' or 'rmsprop'"),
    ({"train": {"strategy": "linear"}, "model": {"weights": "none"}}, r"model.weights=none leaves them random"),
    ({"train": {"strategy": "partial"}, "model": {"stem": "cifar"}}, r"model.stem=cifar"),
    ({"train": {"nproc": 3}}, r"train.batch_size=128 is the global batch and must divide evenly among "
                              r"train.nproc x train.nnodes = 3 processes"),
    ({"train": {"nproc": 2, "device": "cuda:1"}}, r"train.device=cuda:1 names one GPU, but 2 processes train"),
    ({"train": {"nnodes": 2, "rdzv_endpoint": "node0"}}, r"train.rdzv_endpoint: must be host:port"),
    ({"train": {"rotation": 181}}, r"train.rotation: Input should be less than or equal to 180 \(got 181\)"),
    ({"train": {"rotation": -5}}, r"train.rotation: Input should be greater than or equal to 0"),
    ({"train": {"color_jitter": 1.5}}, r"train.color_jitter: Input should be less than or equal to 1 \(got 1.5\)"),
    ({"train": {"color_jitter": -0.1}}, r"train.color_jitter: Input should be greater than or equal to 0"),
])
def test_bad_params_name_the_file_and_key(tmp_path, params, message):
    path = _write(tmp_path, params)
    with pytest.raises(ReprotuneError, match=message) as error:
        load_params(path)
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.reliability
def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ReprotuneError, match="no such params file"):
        load_params(tmp_path / "absent.yaml")
    (tmp_path / "broken.yaml").write_text("seed: 0\ntrain:\n  lr: [0.1\n  epochs: 2\n")
    with pytest.raises(ReprotuneError) as error:  # PyYAML's own position of the problem is kept
        load_params(tmp_path / "broken.yaml")
    assert str(error.value) == (f"{tmp_path / 'broken.yaml'}: line 4, column 9: not valid YAML: "
                                "expected ',' or ']', but got ':'")


@pytest.mark.reliability
def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.5\n")
    with pytest.raises(ReprotuneError) as error:
        load_params(path)
    assert str(error.value) == f"{path}: key 'lr' appears twice in one section, at lines 2 and 4"


@pytest.mark.reliability
@pytest.mark.parametrize("section, key, value, message", [
    ("train", "batch_size", "512", "Input should be a valid integer"),
    ("train", "lr", "0.01", "Input should be a valid number"),
    ("train", "epochs", 2.0, "Input should be a valid integer"),
    ("train", "hflip", "yes", "Input should be a valid boolean"),
])
def test_types_are_strict(tmp_path, section, key, value, message):
    # YAML already gives numbers and booleans their types: a quoted value is a mistake, not a hint.
    with pytest.raises(ReprotuneError, match=rf"{section}.{key}: {message} \(got {value!r}\)"):
        load_params(_write(tmp_path, {section: {key: value}}))
    params = load_params(_write(tmp_path, {"train": {"lr": 1, "betas": [0.8, 0.9], "rotation": 180,
                                                     "color_jitter": 1}}))  # what is right is taken
    assert params.train.lr == 1.0 and params.train.betas == (0.8, 0.9)
    assert params.train.rotation == 180.0 and params.train.color_jitter == 1.0  # the bounds themselves


@pytest.mark.reliability
def test_a_stage_with_bad_params_prints_one_line_and_exits_1(tmp_path):
    path = _write(tmp_path, {"train": {"learning_rate": 0.1}})
    proc = run(["python", str(REPO / "stages/finetune.py"), "--params", str(path)], tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"reprotune: error: {path}: unknown key 'train.learning_rate' (did you mean 'train.lr'?)"]
    assert list(tmp_path.iterdir()) == [path]  # nothing written


@pytest.mark.reliability
def test_a_gpu_that_is_not_there_is_refused_naming_the_file_and_key(tmp_path):
    missing = torch.cuda.device_count()  # one past the last GPU: cuda:0 on a machine without any
    path = _write(tmp_path, {"train": {"device": f"cuda:{missing}"}})
    split = Split(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4) % 2, ["a", "b"], [0.5] * 3, [0.2] * 3)
    with pytest.raises(ReprotuneError) as error:
        finetune(load_params(path), split, split, Checkpoints(tmp_path / "work", "key"))
    assert re.fullmatch(rf"{re.escape(str(path))}: train.device=cuda:{missing} but (this machine has no CUDA "
                        rf"device \(use auto or cpu\)|only {missing} CUDA device\(s\) exist)", str(error.value))


def test_params_yaml_and_the_parameter_reference_are_written_from_the_config_classes():
    # One source for every default and its description: config.py. `reprotune params --write`
    # regenerates both files after a change there.
    assert (REPO / "params.yaml").read_text() == paramsdoc.params_yaml(), "run `reprotune params --write`"
    reference = (REPO / paramsdoc.REFERENCE).read_text()
    assert paramsdoc.with_table(reference) == reference, "run `reprotune params --write`"
    for name, section in (("train", TrainConfig), ("export", ExportConfig)):  # and every key is in both
        for key, field in section.model_fields.items():
            first = field.description.split("\n\n")[0].replace("\n", " ")
            assert f"# {first}" in (REPO / "params.yaml").read_text(), f"{name}.{key}"
            assert f"| `{name}.{key}` |" in reference


def test_the_params_command_writes_both_files(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 3\n")
    reference = tmp_path / paramsdoc.REFERENCE
    reference.parent.mkdir(parents=True)
    reference.write_text(f"intro\n{paramsdoc.TABLE_BEGIN}\nold\n{paramsdoc.TABLE_END}\nrest\n")
    out = run(["reprotune", "params", "--write"], tmp_path).stdout
    assert "params.yaml" in out and "docs/reference/parameters.md" in out
    assert (tmp_path / "params.yaml").read_text() == paramsdoc.params_yaml()
    text = reference.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "| `train.lr` | `0.01` |" in text
    assert run(["reprotune", "params", "--write"], tmp_path).stdout == ""  # nothing left to change


def test_the_params_command_without_the_reference_or_its_markers_says_so_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 3\n")
    proc = run(["reprotune", "params", "--write"], tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "docs/reference/parameters.md is missing" in proc.stderr
    (tmp_path / paramsdoc.REFERENCE).parent.mkdir(parents=True)
    (tmp_path / paramsdoc.REFERENCE).write_text("no markers\n")
    proc = run(["reprotune", "params", "--write"], tmp_path, check=False)
    assert proc.returncode == 1 and f"has no {paramsdoc.TABLE_BEGIN}" in proc.stderr, proc.stderr


def test_the_review_views_know_every_params_section():
    # `reprotune experiments` and `review` keep the params of these sections that differ: a new
    # section missing here would hide its experiments' settings.
    assert PARAM_SECTIONS == list(Params.model_fields)
