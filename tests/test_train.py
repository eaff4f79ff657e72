"""The training engine on tiny in-memory data: optimizers, schedules, clipping, EMA, early stopping."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

from reprotune import data, train
from reprotune.checkpoint import Checkpoints
from reprotune.config import ModelConfig, Params, TrainConfig
from reprotune.device import set_deterministic
from reprotune.errors import ReprotuneError
from reprotune.model import Classifier, build_model, frozen_stages
from reprotune.optim import make_optimizer, make_scheduler, param_groups
from reprotune.train import clip_gradients, finetune

MEAN, STD = [0.5] * 3, [0.25] * 3


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(400) % 10)
    images = data.synthetic_images(labels, rng).reshape(-1, 3, 32, 32)
    raw = data.RawData(images, labels, images[:50], labels[:50], data.SYNTHETIC_CLASSES)
    return data.make_splits(raw, 0.2, seed=0)


def _params(model=None, **train_cfg) -> Params:
    # On the CPU whatever the host has: these tests pin CPU semantics (tests/test_gpu.py has CUDA's).
    return Params.model_validate({"model": {"weights": "none", **(model or {})},
                                  "log": {"graph": False, "images": 4, "histograms": False},
                                  "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "device": "cpu", **train_cfg}})


def _fit(params, splits, tmp_path, name="run"):
    return finetune(params, splits["train"], splits["val"], Checkpoints(tmp_path / name, name))


def _lrs(cfg: TrainConfig, steps_per_epoch: int = 10) -> tuple[list[float], list[float]]:
    """Head and backbone LR in effect at each optimizer step of a whole run."""
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    head, backbone = [], []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        head.append(lrs["head/decay"])
        backbone.append(lrs["backbone/decay"])
        optimizer.step()
        scheduler.step()
    return head, backbone


def test_cosine_schedule_with_warmup_follows_the_formula():
    cfg = TrainConfig(epochs=4, lr=0.1, scheduler="cosine", warmup_epochs=1, backbone_lr_mult=0.1)
    head, backbone = _lrs(cfg)
    warm, total = 10, 40
    expected = [0.1 * (0.01 + 0.99 * k / warm) for k in range(warm)]
    expected += [0.1 * 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm))) for k in range(warm, total)]
    assert head == pytest.approx(expected, abs=1e-12)
    assert backbone == pytest.approx([lr * 0.1 for lr in expected], abs=1e-12)


def test_step_schedule_follows_the_formula():
    head, _ = _lrs(TrainConfig(epochs=7, lr=0.1, scheduler="step", step_epochs=3, step_gamma=0.5))
    assert head == pytest.approx([0.1 * 0.5 ** (k // 30) for k in range(70)])


def test_onecycle_schedule_follows_the_formula():
    head, _ = _lrs(TrainConfig(epochs=5, lr=0.1, scheduler="onecycle"))
    total, peak = 50, 0.3 * 50 - 1
    start, end = 0.1 / 25, 0.1 / 25 / 1e4

    def cos_anneal(a, b, pct):
        return b + (a - b) / 2 * (1 + math.cos(math.pi * pct))

    expected = [cos_anneal(start, 0.1, k / peak) if k <= peak else cos_anneal(0.1, end, (k - peak) / (total - 1 - peak))
                for k in range(total)]
    assert head == pytest.approx(expected)
    assert max(head) == pytest.approx(0.1) and head[-1] == pytest.approx(end)


def test_constant_schedule():
    assert set(_lrs(TrainConfig(epochs=2, lr=0.1, scheduler="none"))[0]) == {0.1}


def test_param_groups_spare_norm_and_bias_from_weight_decay():
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD)
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(weight_decay=0.01, backbone_lr_mult=0.5))}
    assert set(groups) == {"backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay"}
    assert all(p.ndim > 1 for p in groups["backbone/decay"]["params"])
    assert all(p.ndim == 1 for p in groups["backbone/no_decay"]["params"])
    assert groups["backbone/no_decay"]["weight_decay"] == 0 and groups["head/decay"]["weight_decay"] == 0.01
    assert groups["backbone/decay"]["lr"] == 0.005 and groups["head/decay"]["lr"] == 0.01
    everything = param_groups(model, TrainConfig(weight_decay=0.01, decay_norm_and_bias=True))
    assert {g["name"] for g in everything} == {"backbone/decay", "head/decay"}
    assert sum(len(g["params"]) for g in everything) == len(list(model.parameters()))


@pytest.mark.parametrize("optimizer, settings", [
    ("sgd", {"momentum": 0.9, "nesterov": True}), ("adam", {"betas": (0.8, 0.99)}),
    ("adamw", {"betas": (0.9, 0.95)}), ("rmsprop", {"momentum": 0.5}),
])
def test_optimizers_get_their_own_settings(optimizer, settings):
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD)
    built = make_optimizer(model, TrainConfig(optimizer=optimizer, **settings))
    for key, value in settings.items():
        assert all(tuple(g[key]) == value if key == "betas" else g[key] == value for g in built.param_groups)


def test_gradual_unfreezing_thaws_deepest_stages_first():
    assert frozen_stages("linear", "layer3", 2, 1) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert frozen_stages("linear", "layer3", 2, 2) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert frozen_stages("linear", "layer3", 2, 3) == ["conv1", "bn1", "layer1", "layer2", "layer3"]
    assert frozen_stages("partial", "layer3", 1, 3) == ["conv1", "bn1"]
    assert frozen_stages("partial", "layer3", 1, 9) == []
    assert frozen_stages("partial", "layer3", 0, 9) == ["conv1", "bn1", "layer1", "layer2"]


def _scaled_step(model, scaler, loss_scale_input):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = (model(torch.full((4, 8), loss_scale_input)) ** 2).sum()
    scaler.scale(loss).backward()


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_clipping_under_fp16_autocast_acts_on_unscaled_gradients(mode):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Reference: the same gradients in fp32 without a scaler.
    _scaled_step(model, torch.amp.GradScaler("cpu", enabled=False), 1.0)
    reference = [p.grad.clone() for p in model.parameters()]
    reference_norm = torch.nn.utils.get_total_norm(reference)

    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    _scaled_step(model, scaler, 1.0)
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) > 100 * reference_norm  # scaled
    scaler.unscale_(optimizer)
    cfg = TrainConfig(grad_clip=1.0, grad_clip_mode=mode)
    norm, fired = clip_gradients(list(model.parameters()), cfg)
    assert norm.item() == pytest.approx(reference_norm.item(), rel=1e-2)  # the norm before clipping
    assert fired.item()
    grads = [p.grad for p in model.parameters()]
    if mode == "norm":
        assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(1.0, rel=1e-3)
        for got, ref in zip(grads, reference, strict=True):  # same direction as the fp32 gradient
            torch.testing.assert_close(got, ref / reference_norm, rtol=2e-2, atol=1e-3)
    else:
        assert max(g.abs().max().item() for g in grads) <= 1.0


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


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_every_optimizer_trains(splits, tmp_path, optimizer):
    lr = 0.05 if optimizer == "sgd" else 1e-3
    result = _fit(_params(optimizer=optimizer, lr=lr, epochs=1, channels_last=optimizer == "adamw"), splits, tmp_path)
    assert math.isfinite(result.metrics["final_train_loss"])


def test_fp16_autocast_with_grad_scaler_on_cpu(splits, tmp_path, recwarn):
    # fp16 autocast is slow on CPU: a few steps on a slice are enough to exercise the scaler.
    small = {name: data.Split(s.images[:48], s.labels[:48], s.classes, s.mean, s.std) for name, s in splits.items()}
    result = _fit(_params(amp="fp16", grad_clip=0.5, epochs=1, batch_size=16), small, tmp_path)
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


def _with_steps(splits, per_epoch_steps: int, batch_size: int = 8):
    """The splits, with the training split cut to exactly `per_epoch_steps` batches."""
    train_split = splits["train"]
    n = per_epoch_steps * batch_size
    return {**splits, "train": data.Split(train_split.images[:n], train_split.labels[:n], train_split.classes,
                                          train_split.mean, train_split.std)}


@pytest.mark.reliability
def test_a_diverging_run_stops_within_a_bounded_number_of_steps(splits, tmp_path):
    # An absurd LR, no clipping: the loss is NaN or infinite after a step or two, yet the check
    # reads the device only every CHECK_EVERY steps. It must stop at the first check, long before
    # the epoch's end (40 steps), with nothing kept.
    with pytest.raises(ReprotuneError) as error:
        _fit(_params(lr=1e12, grad_clip=0, batch_size=8, epochs=1), _with_steps(splits, 40), tmp_path, "nan")
    message = str(error.value)
    assert re.fullmatch(rf"training loss became (nan|inf) in epoch 1 at step {train.CHECK_EVERY} of 40: lower "
                        r"train.lr or set train.grad_clip \(no epoch had finished, so no checkpoint was kept\)",
                        message), message
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


@pytest.mark.reliability
def test_divergence_in_a_later_epoch_keeps_the_last_good_checkpoint(splits, tmp_path, monkeypatch):
    # A schedule that multiplies the LR by 1e12 from the first step of epoch 2: a real divergence
    # through the real loop, at a known step.
    def exploding(optimizer, cfg, steps_per_epoch):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < steps_per_epoch else 1e12)

    monkeypatch.setattr(train, "make_scheduler", exploding)
    with pytest.raises(ReprotuneError, match=rf"training loss became (nan|inf) in epoch 2 at step "
                                             rf"{train.CHECK_EVERY} of 40: .*\(the checkpoint of epoch 1 is kept"):
        _fit(_params(grad_clip=0, batch_size=8, epochs=3), _with_steps(splits, 40), tmp_path, "nan")
    saved = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and "progress" not in saved
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


def test_torch_compile_trains_the_same_model_object(splits, tmp_path):
    # Compiling takes ~40 s on 2 CPU cores: one step on one batch is enough to prove the path.
    small = {name: data.Split(s.images[:32], s.labels[:32], s.classes, s.mean, s.std) for name, s in splits.items()}
    result = _fit(_params(compile=True, epochs=1, batch_size=32), small, tmp_path)
    assert math.isfinite(result.metrics["final_train_loss"])
    assert all(not k.startswith("_orig_mod") for k in result.model.state_dict())


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


@pytest.mark.parametrize("init, check", [
    ("xavier", lambda w: w.abs().max() <= math.sqrt(6 / (512 + 10))),
    ("kaiming", lambda w: abs(w.std().item() - math.sqrt(2 / 512)) < 0.01),
])
def test_head_initialization(init, check):
    torch.manual_seed(0)
    head = build_model(ModelConfig(weights="none", head_init=init), 10, MEAN, STD).net.fc[1]
    assert check(head.weight) and torch.equal(head.bias, torch.zeros(10))



def test_a_paused_epoch_resumes_on_the_training_device():
    # A checkpoint is read onto the CPU. On a GPU the paused epoch's order and running sums must go
    # back to the GPU, or the first resumed step adds CUDA losses into CPU sums and fails (as every
    # rerun would, since the checkpoint still matches). On CPU this shows the restore moves every
    # tensor to the device it is handed, here PyTorch's "meta" device standing in for a GPU;
    # tests/test_gpu.py interrupts and resumes a real CUDA run.
    saved = {"order": torch.randperm(10), "sums": torch.zeros(5), "step": 3, "seen": 96, "seconds": 1.5}
    progress = train.EpochProgress.restore(saved, torch.device("meta"))
    assert progress.order.device.type == "meta" and progress.sums.device.type == "meta"
    assert (progress.step, progress.seen, progress.seconds) == (3, 96, 1.5)


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
