"""Named recipes (`reprotune recipe`): each fits params.yaml, means what its name says, and trains."""

from __future__ import annotations

import pytest
import yaml

from fixtures import REPO, run, synthetic_splits
from reprotune.config import Params
from reprotune.errors import ReprotuneError
from reprotune.recipes import RECIPES
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.loop import finetune


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_fits_the_defaults_and_the_shipped_params(name):
    recipe = RECIPES[name]
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    for base in (None, shipped):
        params = recipe.params(base)
        for key, value in recipe.overrides.items():
            section, field = key.split(".")
            assert getattr(getattr(params, section), field) == value, key


def test_recipes_mean_what_their_names_say():
    scratch, f32, f224 = RECIPES["scratch"].params(), RECIPES["finetune-32"].params(), RECIPES["finetune-224"].params()
    assert scratch.model.weights == "none" and f32.model.weights != "none" and f224.model.weights != "none"
    assert f32.model.image_size == 32 and f224.model.image_size == 224
    assert scratch.train.lr > f32.train.lr  # random weights take larger steps than pretrained ones
    assert all(p.train.strategy == "full" for p in (scratch, f32, f224))


def test_the_arguments_are_what_dvc_exp_run_takes():
    args = RECIPES["scratch"].arguments()
    assert args[::2] == ["-S"] * len(RECIPES["scratch"].overrides)
    assert "model.weights=none" in args and "train.lr=0.05" in args
    parsed = {a.split("=")[0]: yaml.safe_load(a.split("=", 1)[1]) for a in args[1::2]}
    assert parsed == RECIPES["scratch"].overrides  # YAML reads each value back as the recipe's


def test_a_recipe_that_does_not_fit_names_the_conflict():
    with pytest.raises(ReprotuneError, match="train.strategy=linear freezes layers, but model.weights=none"):
        RECIPES["scratch"].params({"train": {"strategy": "linear"}})


def test_the_command_prints_lists_and_refuses(tmp_path):
    assert run(["reprotune", "recipe", "scratch"], REPO).stdout.strip() == " ".join(RECIPES["scratch"].arguments())
    listing = run(["reprotune", "recipe"], tmp_path).stdout
    assert all(name in listing for name in RECIPES)
    bad = run(["reprotune", "recipe", "sratch"], tmp_path, check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "reprotune: error: no recipe 'sratch': choose one of " + ", ".join(RECIPES)]
    (tmp_path / "params.yaml").write_text("train:\n  strategy: partial\n")
    clash = run(["reprotune", "recipe", "scratch"], tmp_path, check=False)
    assert clash.returncode == 1 and clash.stdout == ""
    assert "recipe scratch does not fit params.yaml: " in clash.stderr


def test_the_scratch_recipe_learns_a_small_dataset(tmp_path):
    # The recipe as it is (epochs, batch, LR, defaults for the rest) on 400 synthetic images.
    splits = synthetic_splits(400, 50, 0.2)
    base = {"log": {"graph": False, "histograms": False, "images": 0}, "train": {"device": "cpu"}}
    params: Params = RECIPES["scratch"].params(base)
    result = finetune(params, splits["train"], splits["val"], Checkpoints(tmp_path / "run", "run"))
    assert result.metrics["best_val_acc"] >= 0.3  # 10 classes: chance is 0.1 (measured 0.46 here)


@pytest.mark.parametrize("name", list(RECIPES))
def test_dvc_writing_a_recipe_into_params_yaml_changes_only_its_keys(tmp_path, name):
    # `dvc exp run -S` (the demo, every recipe) rewrites params.yaml through DVC's own YAML round trip:
    # anything the file spelled otherwise (a flow list, [0.9, 0.999]) came back changed in `git diff`.
    from dvc.utils.hydra import apply_overrides

    shipped = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(shipped)
    apply_overrides(str(tmp_path / "params.yaml"), RECIPES[name].arguments()[1::2])
    changed = [(old, new) for old, new in zip(shipped.splitlines(), (tmp_path / "params.yaml").read_text().splitlines(),
                                              strict=True) if old != new]
    keys = {key.rsplit(".", 1)[-1] for key in RECIPES[name].overrides}
    assert changed and all(old.split(":")[0].strip() in keys for old, _ in changed), changed
