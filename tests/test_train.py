"""The training loop on tiny in-memory data: schedules, determinism, best-epoch selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tensorboardX import SummaryWriter

from reprotune import data
from reprotune.config import Params, TrainConfig
from reprotune.errors import ReprotuneError
from reprotune.train import finetune, lr_factor


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(400) % 10)
    images = data.synthetic_images(labels, rng).reshape(-1, 3, 32, 32)
    raw = data.RawData(images, labels, images[:50], labels[:50], data.SYNTHETIC_CLASSES)
    return data.make_splits(raw, 0.2, seed=0)


def _params(**train) -> Params:
    return Params.model_validate({"model": {"weights": "none"}, "log": {"graph": False, "images": 4},
                                  "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, **train}})


def test_cosine_and_step_schedules_follow_their_formulas():
    cosine = TrainConfig(epochs=4, scheduler="cosine")
    assert lr_factor(0, cosine, 10) == 1.0
    assert lr_factor(20, cosine, 10) == pytest.approx(0.5)
    assert lr_factor(40, cosine, 10) == pytest.approx(0.0)
    assert lr_factor(13, cosine, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 13 / 40)))
    step = TrainConfig(epochs=9, scheduler="step", step_epochs=3, step_gamma=0.1)
    assert [lr_factor(e * 10, step, 10) for e in (0, 2, 3, 6)] == pytest.approx([1, 1, 0.1, 0.01])
    assert lr_factor(55, TrainConfig(scheduler="none"), 10) == 1.0


def test_training_is_seeded_learns_and_keeps_the_best_epoch(splits, tmp_path):
    results = []
    for run in range(2):
        with SummaryWriter(str(tmp_path / str(run))) as writer:
            results.append(finetune(_params(), splits["train"], splits["val"], writer))
    first, second = results
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    assert first.history == [{**row, "seconds": first.history[i]["seconds"],
                              "images_per_second": first.history[i]["images_per_second"]}
                             for i, row in enumerate(second.history)]
    assert first.metrics["best_val_acc"] == max(row["val_acc"] for row in first.history)
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    assert first.metrics["best_val_acc"] > 0.2  # 10 classes: chance is 0.1


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_every_optimizer_trains(splits, tmp_path, optimizer):
    lr = 0.05 if optimizer == "sgd" else 1e-3
    with SummaryWriter(str(tmp_path)) as writer:
        result = finetune(_params(optimizer=optimizer, lr=lr, epochs=1), splits["train"], splits["val"], writer)
    assert math.isfinite(result.metrics["final_train_loss"])


def test_fp16_autocast_with_grad_scaler_and_clipping_on_cpu(splits, tmp_path, recwarn):
    # fp16 autocast is slow on CPU: a few steps on a slice are enough to exercise the scaler.
    small = {name: data.Split(s.images[:48], s.labels[:48], s.classes, s.mean, s.std)
             for name, s in splits.items()}
    with SummaryWriter(str(tmp_path)) as writer:
        result = finetune(_params(amp="fp16", grad_clip=0.5, epochs=1, batch_size=16),
                          small["train"], small["val"], writer)
    assert math.isfinite(result.metrics["final_train_loss"])
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_a_diverging_run_stops_with_a_clear_error(splits, tmp_path):
    with SummaryWriter(str(tmp_path)) as writer, pytest.raises(ReprotuneError, match="training loss became nan"):
        finetune(_params(lr=1e12, grad_clip=0, epochs=1), splits["train"], splits["val"], writer)
