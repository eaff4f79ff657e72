"""params.yaml validation: the shipped file, and the one-line errors for bad ones."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO, run
from reprotune.config import Params, load_params
from reprotune.errors import ReprotuneError


def test_shipped_params_are_the_documented_defaults():
    # The config classes' defaults document params.yaml; they must not drift apart.
    assert load_params(REPO / "params.yaml") == Params()


def test_shipped_params_describe_the_real_job():
    params = load_params(REPO / "params.yaml")
    assert params.data.dataset == "cifar10" and params.data.md5 == "c58f30108f718f92721af3b95e74349a"
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
    (tmp_path / "broken.yaml").write_text("train: [unclosed")
    with pytest.raises(ReprotuneError, match="cannot read params"):
        load_params(tmp_path / "broken.yaml")


@pytest.mark.reliability
def test_a_stage_with_bad_params_prints_one_line_and_exits_1(tmp_path):
    path = _write(tmp_path, {"train": {"learning_rate": 0.1}})
    proc = run(["python", str(REPO / "stages/finetune.py"), "--params", str(path)], tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"reprotune: error: {path}: unknown key 'train.learning_rate' (did you mean 'train.lr'?)"]
    assert list(tmp_path.iterdir()) == [path]  # nothing written
