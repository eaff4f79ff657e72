"""The training engine on tiny in-memory data: optimizers, schedules, clipping, EMA, early stopping."""

from __future__ import annotations

import io
import math
import os
import re

import numpy as np
import PIL.Image
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fixtures import synthetic_splits
from reprotune.config import ModelConfig, Params
from reprotune.data.splits import Split
from reprotune.errors import ReprotuneError
from reprotune.tracking import tensorboard
from reprotune.training import augment as augmentation
from reprotune.training import loop
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.device import set_deterministic
from reprotune.training.loop import finetune
from reprotune.training.model import Classifier, build_model


@pytest.fixture(scope="module")
def splits():
    return synthetic_splits(400, 50, 0.2)


def _params(model=None, **train_cfg) -> Params:
    # On the CPU whatever the host has: these tests pin CPU semantics (tests/test_gpu.py has CUDA's).
    return Params.model_validate({"model": {"weights": "none", **(model or {})},
                                  "log": {"graph": False, "images": 4, "histograms": False},
                                  "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "device": "cpu", **train_cfg}})


def _fit(params, splits, tmp_path, name="run"):
    return finetune(params, splits["train"], splits["val"], Checkpoints(tmp_path / name, name))


def test_training_is_seeded_learns_and_keeps_the_best_epoch(splits, tmp_path):
    first, second = (_fit(_params(deterministic=True, epochs=3), splits, tmp_path, name) for name in ("a", "b"))
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    timing = ("seconds", "images_per_second", "achieved_tflops", "peak_rss_mb")
    assert [{k: v for k, v in row.items() if k not in timing} for row in first.history] == \
           [{k: v for k, v in row.items() if k not in timing} for row in second.history]
    assert first.metrics["best_val_acc"] == max(row["val_acc"] for row in first.history)
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    assert first.metrics["best_val_acc"] > 0.2  # 10 classes: chance is 0.1
    assert first.metrics["flops_per_image"] > 1e8  # ResNet18 at 32 px: ~0.11 GFLOPs forward + backward


def test_fp16_autocast_with_grad_scaler_on_cpu(splits, tmp_path, recwarn):
    # fp16 autocast is slow on CPU (a second a step of 8 images here): three steps on a slice are
    # enough to exercise the scaler, which backs off three times in them.
    small = {name: Split(s.images[:24], s.labels[:24], s.classes, s.mean, s.std) for name, s in splits.items()}
    result = _fit(_params(amp="fp16", grad_clip=0.5, epochs=1, batch_size=8), small, tmp_path)
    assert math.isfinite(result.metrics["final_train_loss"])
    assert result.history[0]["loss_scale"] < 65536.0  # the scaler backed off at least once
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_ema_weights_are_the_ones_validated_and_saved(splits, tmp_path):
    torch.manual_seed(0)
    initial = build_model(ModelConfig(weights="none"), 10, splits["train"].mean, splits["train"].std).state_dict()
    plain = _fit(_params(epochs=1), splits, tmp_path, "plain")
    ema = _fit(_params(epochs=1, ema_decay=0.999), splits, tmp_path, "ema")

    def distance(state):
        return sum((state[k].float() - initial[k].float()).norm().item() for k in initial if "weight" in k)

    # The average starts from the weights after step 1; 9 more steps at 0.999 barely move it, while
    # the raw weights keep moving. Saving the raw weights would give a ratio of 1.
    assert distance(ema.model.state_dict()) < 0.3 * distance(plain.model.state_dict())
    assert ema.metrics["best_val_acc"] != plain.metrics["best_val_acc"] or \
        ema.metrics["best_val_loss"] != plain.metrics["best_val_loss"]


def test_early_stopping_after_patience_epochs_without_improvement(splits, tmp_path):
    # An lr so small that only BatchNorm statistics move: val accuracy soon stops improving.
    result = _fit(_params(epochs=8, lr=1e-12, early_stop_patience=2, early_stop_metric="val_acc"), splits, tmp_path)
    best = result.metrics["best_epoch"]
    assert result.metrics["stopped_early"] is True
    assert result.metrics["epochs"] == best + 2 == len(result.history)
    accs = [row["val_acc"] for row in result.history]
    assert accs[best - 1] == max(accs) and max(accs[best:]) <= accs[best - 1]


def test_early_stopping_on_val_loss_keeps_the_lowest_loss_epoch(splits, tmp_path):
    # With an lr of 1e-12 only BatchNorm's statistics move, and the validation loss climbs from epoch
    # 1 on: stopping on val_loss must keep epoch 1 and stop two epochs later.
    result = _fit(_params(epochs=8, lr=1e-12, early_stop_patience=2, early_stop_metric="val_loss"), splits, tmp_path)
    losses = [row["val_loss"] for row in result.history]
    best = result.metrics["best_epoch"]
    assert result.metrics["stopped_early"] is True and len(losses) == best + 2
    assert losses[best - 1] == min(losses) == result.metrics["best_val_loss"]
    assert result.metrics["best_val_acc"] == result.history[best - 1]["val_acc"]  # that epoch's accuracy


def _with_steps(splits, per_epoch_steps: int, batch_size: int = 8):
    """The splits, with the training split cut to exactly `per_epoch_steps` batches."""
    train_split = splits["train"]
    n = per_epoch_steps * batch_size
    return {**splits, "train": Split(train_split.images[:n], train_split.labels[:n], train_split.classes,
                                          train_split.mean, train_split.std)}


@pytest.mark.reliability
def test_a_diverging_run_stops_within_a_bounded_number_of_steps(splits, tmp_path):
    # An absurd LR, no clipping: the loss is NaN or infinite after a step or two, yet the check
    # reads the device only every CHECK_EVERY steps. It must stop at the first check, long before
    # the epoch's end (40 steps), with nothing kept.
    with pytest.raises(ReprotuneError) as error:
        _fit(_params(lr=1e12, grad_clip=0, batch_size=8, epochs=1), _with_steps(splits, 40), tmp_path, "nan")
    message = str(error.value)
    assert re.fullmatch(rf"training loss became (nan|inf) in epoch 1 at step {loop.CHECK_EVERY} of 40: lower "
                        r"train.lr or set train.grad_clip \(no epoch had finished, so no checkpoint was kept\)",
                        message), message
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


@pytest.mark.reliability
def test_divergence_in_a_later_epoch_keeps_the_last_good_checkpoint(splits, tmp_path, monkeypatch):
    # A schedule that multiplies the LR by 1e12 from the first step of epoch 2: a real divergence
    # through the real loop, at a known step.
    def exploding(optimizer, cfg, steps_per_epoch):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < steps_per_epoch else 1e12)

    monkeypatch.setattr(loop, "make_scheduler", exploding)
    with pytest.raises(ReprotuneError, match=rf"training loss became (nan|inf) in epoch 2 at step "
                                             rf"{loop.CHECK_EVERY} of 40: .*\(the checkpoint of epoch 1 is kept"):
        _fit(_params(grad_clip=0, batch_size=8, epochs=3), _with_steps(splits, 40), tmp_path, "nan")
    saved = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert saved["run"]["epoch"] == 1 and saved["run"]["paused"] is None
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.dtype.is_floating_point)


class _NoDeterministicBackward(torch.autograd.Function):
    """Identity whose backward uses an op torch has no deterministic kernel for, on any device
    (`Tensor.put_`): what adaptive pooling's or bilinear resizing's backward is on CUDA."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        torch.zeros(2).put_(torch.tensor([0]), torch.ones(1))
        return grad


@pytest.mark.reliability
def test_deterministic_mode_refuses_an_op_without_a_deterministic_kernel_before_training(
        splits, tmp_path, monkeypatch):
    forward = Classifier.forward
    monkeypatch.setattr(Classifier, "forward", lambda self, x: _NoDeterministicBackward.apply(forward(self, x)))
    with pytest.raises(ReprotuneError) as error:
        _fit(_params(deterministic=True, epochs=1), splits, tmp_path, "refused")
    assert str(error.value) == ("train.deterministic=true, but put_ has no deterministic implementation on "
                                "this device: set train.deterministic to false")
    assert not (tmp_path / "refused").exists()  # refused before training: not even a checkpoint directory
    _fit(_params(deterministic=False, epochs=1), splits, tmp_path, "allowed")  # the same model trains without it


@pytest.mark.parametrize("hook, setting", [("rotate", {"rotation": 15}), ("jitter_colours", {"color_jitter": 0.4})])
def test_the_deterministic_trial_step_rehearses_rotation_and_jitter(splits, tmp_path, monkeypatch, hook, setting):
    # The trial step augments as the loop does: an op without a deterministic kernel in the rotation
    # or the jitter is refused before training, not met in the middle of the first epoch.
    real = getattr(augmentation, hook)

    def nondeterministic(images, *args):
        torch.zeros(2).put_(torch.tensor([0]), torch.ones(1))
        return real(images, *args)

    monkeypatch.setattr(augmentation, hook, nondeterministic)
    try:
        with pytest.raises(ReprotuneError, match="put_ has no deterministic implementation"):
            _fit(_params(deterministic=True, epochs=1, **setting), splits, tmp_path, "refused")
    finally:
        set_deterministic(False)
    assert not (tmp_path / "refused").exists()  # refused before training


def test_the_logged_sample_batch_is_augmented_as_training_is(splits, tmp_path):
    # TensorBoard's train/augmented_batch shows the run's rotation and jitter, read back with
    # TensorBoard's own reader: the grid of `augmented` with the sample generator, not a plain one.
    small = {name: Split(s.images[:32], s.labels[:32], s.classes, s.mean, s.std) for name, s in splits.items()}
    params = _params(epochs=1, rotation=45, color_jitter=0.5)
    _fit(params, small, tmp_path)
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0})
    events.Reload()
    png = events.Images("train/augmented_batch")[0].encoded_image_string
    logged = torch.from_numpy(np.array(PIL.Image.open(io.BytesIO(png)).convert("RGB"))).permute(2, 0, 1)
    images = small["train"].images[:4]
    generator = lambda: torch.Generator().manual_seed(params.seed + 1)  # noqa: E731 - a fresh one per config
    expected, plain = (tensorboard.image_grid(loop.augmented(images, cfg, generator()), 4)
                       for cfg in (params.train, _params().train))
    assert torch.equal(logged, expected) and not torch.equal(logged, plain)


def test_torch_compile_trains_the_model_it_returns(splits, tmp_path):
    # Compiling takes ~40 s on 2 CPU cores: two steps on two batches are enough to prove the path.
    small = {name: Split(s.images[:64], s.labels[:64], s.classes, s.mean, s.std) for name, s in splits.items()}
    torch.manual_seed(0)  # finetune seeds the same way before building: these are its initial weights
    initial = build_model(ModelConfig(weights="none"), 10, small["train"].mean, small["train"].std).state_dict()
    result = _fit(_params(compile=True, epochs=1, batch_size=32), small, tmp_path)
    assert math.isfinite(result.metrics["final_train_loss"])
    trained = result.model.state_dict()
    assert set(trained) == set(initial)  # the plain model, not the compiled wrapper (no _orig_mod.)
    # what the compiled module learned is in the returned model: its weights moved from the start
    moved = [k for k in initial if initial[k].dtype.is_floating_point and not torch.equal(initial[k], trained[k])]
    assert "net.fc.1.weight" in moved and "net.conv1.weight" in moved


def test_gradual_unfreezing_trains_thawed_stages_only_from_their_epoch(splits, tmp_path, weights_file):
    torch.manual_seed(0)
    params = _params({"weights": str(weights_file)}, strategy="linear", unfreeze_after=1, epochs=2,
                     label_smoothing=0.1)
    result = _fit(params, splits, tmp_path)
    loaded = torch.load(weights_file, weights_only=True)
    state = result.model.net.state_dict()
    changed = {name.split(".")[0] for name, value in state.items()
               if name in loaded and value.dtype.is_floating_point and not torch.equal(value, loaded[name])}
    assert changed == {"layer4"}  # epoch 1: head only; epoch 2: layer4 thawed; the rest never moved


def test_deterministic_mode_sets_the_cublas_workspace_before_cuda_starts(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        set_deterministic(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own choice is kept
        set_deterministic(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_host_images_gather_the_batch_asked_for():
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2)
    host = loop.HostImages(images, torch.device("cpu"))
    assert len(host) == 5 and host.device == torch.device("cpu")
    for idx in ([4, 0], [1, 2, 3], [3]):  # the two buffers alternate and are reused at any size
        assert torch.equal(host[torch.tensor(idx)], images[idx])
