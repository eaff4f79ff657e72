"""Optimizers and learning-rate schedules, built from `params.yaml`'s train section.

Parameter groups split the pretrained backbone from the new head (so the backbone can learn more
slowly) and weights from norm/bias parameters (which get no weight decay unless asked). Every
parameter is in a group, frozen ones too: an optimizer skips parameters whose `.grad` is None, so
frozen layers get neither updates nor decay, and gradual unfreezing only flips `requires_grad`.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    SequentialLR,
    StepLR,
)

from reprotune.config import TrainConfig
from reprotune.training.model import Classifier

WARMUP_START = 0.01  # linear warmup starts at 1% of each group's peak LR
ONECYCLE_PCT, ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 0.3, 25.0, 1e4  # torch's OneCycleLR defaults


def param_groups(model: Classifier, cfg: TrainConfig) -> list[dict]:
    """Groups named `<head|backbone>/<decay|no_decay>` with their own lr and weight decay."""
    groups: dict[str, dict] = {}
    for name, param in model.net.named_parameters():
        part = "head" if name.startswith("fc.") else "backbone"
        # 1-D parameters are BatchNorm scales/shifts and biases: decaying them only shrinks them.
        decay = cfg.decay_norm_and_bias or param.ndim > 1
        key = f"{part}/{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(key, {
            "name": key, "params": [],
            "lr": cfg.lr * (1.0 if part == "head" else cfg.backbone_lr_mult),
            "weight_decay": cfg.weight_decay if decay else 0.0,
        })
        group["params"].append(param)
    return list(groups.values())


def make_optimizer(model: Classifier, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over `param_groups`."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum)
    optimizer = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return optimizer(groups, lr=cfg.lr, betas=cfg.betas)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    """A per-optimizer-step schedule: optional linear warmup, then cosine / step / one-cycle / constant."""
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "onecycle":
        return OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
                          pct_start=ONECYCLE_PCT, div_factor=ONECYCLE_DIV, final_div_factor=ONECYCLE_FINAL_DIV,
                          cycle_momentum=False)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.scheduler == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    elif cfg.scheduler == "step":
        main = StepLR(optimizer, step_size=cfg.step_epochs * steps_per_epoch, gamma=cfg.step_gamma)
    else:
        main = LambdaLR(optimizer, lambda step: 1.0)
    if warmup == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=WARMUP_START, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])
