"""Optimizers and learning-rate schedules: the formulas, the parameter groups, and that each learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fixtures import MEAN, STD
from reprotune.config import ModelConfig, TrainConfig
from reprotune.training.model import build_model
from reprotune.training.optim import WARMUP_START, make_optimizer, make_scheduler, param_groups


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


def test_step_schedule_counts_its_epochs_after_warmup():
    # 10 steps an epoch, 1 epoch of warmup from 1%, then x0.5 every 2 epochs counted from the end of warmup
    head, _ = _lrs(TrainConfig(epochs=6, lr=0.1, scheduler="step", step_epochs=2, step_gamma=0.5, warmup_epochs=1))
    warm = [0.1 * (WARMUP_START + (1 - WARMUP_START) * k / 10) for k in range(10)]
    assert head[:10] == pytest.approx(warm, abs=1e-12)
    assert head[10:] == pytest.approx([0.1 * 0.5 ** ((k - 10) // 20) for k in range(10, 60)], abs=1e-12)


def test_cosine_schedule_ends_at_zero_without_warmup():
    head, _ = _lrs(TrainConfig(epochs=3, lr=0.2, scheduler="cosine"))
    assert head[0] == pytest.approx(0.2) and head == sorted(head, reverse=True)
    assert head == pytest.approx([0.1 * (1 + math.cos(math.pi * k / 30)) for k in range(30)], abs=1e-12)


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-3), ("adamw", 1e-3), ("rmsprop", 1e-3)])
def test_every_optimizer_lowers_the_loss_on_a_problem_it_must_learn(optimizer, lr):
    # 16 images, each its own class pattern: 10 full-batch steps must fit them far below ln(10) (each
    # optimizer here is under 1% of its first loss by then).
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD).train()
    images, labels = torch.rand(16, 3, 32, 32), torch.arange(16) % 10
    built = make_optimizer(model, TrainConfig(optimizer=optimizer, lr=lr, weight_decay=0))
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(images), labels)
        built.zero_grad()
        loss.backward()
        built.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (optimizer, losses[0], losses[-1])


def test_frozen_parameters_get_neither_updates_nor_decay():
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD).train()
    model.net.layer1.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    built = make_optimizer(model, TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.5))
    F.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.arange(4)).backward()
    built.step()
    for name, param in model.net.named_parameters():
        assert torch.equal(param, before[name]) == name.startswith("layer1."), name


def test_a_warmup_of_one_step_starts_at_one_percent():
    head, _ = _lrs(TrainConfig(epochs=2, lr=0.1, scheduler="none", warmup_epochs=0.1))  # 1 of 10 steps
    assert head[0] == pytest.approx(0.1 * WARMUP_START) and set(head[1:]) == {0.1}


def test_onecycle_leaves_momentum_alone():
    cfg = TrainConfig(epochs=2, lr=0.1, scheduler="onecycle", momentum=0.9)
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, 10)
    for _ in range(15):
        optimizer.step()
        scheduler.step()
    assert {g["momentum"] for g in optimizer.param_groups} == {0.9}


@pytest.mark.parametrize("nesterov, momentum, expected", [(False, 0.9, False), (True, 0.9, True), (True, 0.0, False)])
def test_sgd_is_nesterov_only_when_asked_and_with_momentum(nesterov, momentum, expected):
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD)
    optimizer = make_optimizer(model, TrainConfig(optimizer="sgd", nesterov=nesterov, momentum=momentum))
    assert optimizer.defaults["nesterov"] is expected


@pytest.mark.parametrize("name, kind", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                        ("rmsprop", torch.optim.RMSprop), ("sgd", torch.optim.SGD)])
def test_each_optimizer_name_builds_that_optimizer(name, kind):
    # Exactly that class: AdamW subclasses Adam, but decays weights apart from the gradient, Adam through it.
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD)
    assert type(make_optimizer(model, TrainConfig(optimizer=name))) is kind
