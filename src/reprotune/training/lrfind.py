"""`reprotune lr-find`: the LR range test (Smith 2017; fastai's lr_find, Lightning's Tuner.lr_find).

A short sweep on the training split through the real training step (`train.setup` builds the model,
device, precision and augmentation from params.yaml; `train.train_one_epoch` takes each step, with
its clipping and GradScaler), the schedule replaced by an LR that grows exponentially from `start_lr`
to `end_lr`, one batch per step. The loss of every step and its smoothed curve give a suggested
`train.lr`. The weights are thrown away: nothing but the sweep's own folder is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from reprotune.config import Params
from reprotune.data.splits import Split, load_split
from reprotune.errors import ReprotuneError
from reprotune.files import atomic_dir
from reprotune.tracking import tensorboard
from reprotune.training.distributed import ONE_PROCESS
from reprotune.training.loop import Diverged, EpochProgress, setup, train_one_epoch
from reprotune.training.optim import make_optimizer

BETA = 0.98  # smoothing of the loss (fastai's): an average over ~50 steps, bias-corrected at the start
DIVERGED = 4.0  # stop once the smoothed loss is this many times its minimum so far (fastai, Lightning)
SKIP = 0.1  # share of the sweep's first steps the suggestion ignores: the smoothed loss is still mostly noise
RULES = {"steepest": "steepest descent", "minimum": "min-loss/10"}  # name -> what the summary calls it
# Which suggestion is printed as *the* train.lr. Measured (`python bench/lrfind.py`, bench/results/lrfind.md,
# from scratch on synthetic and digits, 3 sweeps each): the rules' mean test accuracies differ by under a
# point (steepest's higher), but min-loss/10 moved at most 1.4x from sweep to sweep and steepest descent up
# to 2.7x (its worst sweep 1.4 points below min-loss/10's worst), and on short sweeps of tiny data (40 steps)
# steepest sometimes landed two decades too low, where training stays at chance: its slope is noise-driven
# while the smoothing is still warming up.
RULE = "minimum"
RECORD, PLOT = "lr_find.json", "lr_find.png"  # beside the TensorBoard events in the output folder


@dataclass
class Sweep:
    """What the range test measured: per step, the LR the head trained at and the batch's loss."""

    lrs: list[float]  # train.lr's group (the head); the backbone's is backbone_lr_mult times it
    losses: list[float]  # the batch's training loss at that LR (finite: a NaN step ends the sweep)
    smoothed: list[float]  # exponentially smoothed losses (BETA), bias-corrected
    steps: int  # steps planned (len(lrs) is fewer when it stopped early)
    start_lr: float
    end_lr: float
    batch_size: int
    device: str  # where it trained, as training would: train.device
    autocast: str  # float16, bfloat16 or off: train.amp on that device
    stopped: str  # why it ended: "end of the sweep" or "diverged: ..."


@dataclass
class Suggestion:
    """The suggested train.lr and both rules behind it; None where a rule found nothing."""

    lr: float | None  # the suggested train.lr (`rule`'s)
    rule: str
    steepest: float | None  # the LR where the smoothed loss falls fastest against log LR, below its minimum
    minimum: float | None  # the LR of the smoothed loss's minimum, divided by 10
    min_loss_lr: float | None  # the LR of the smoothed loss's minimum


def lr_at(step: int, steps: int, start_lr: float, end_lr: float) -> float:
    """The sweep's LR at `step` (0-based): exponential from start_lr (step 0) to end_lr (the last)."""
    return start_lr * (end_lr / start_lr) ** (step / max(1, steps - 1))


def sweep(params: Params, train: Split, steps: int, start_lr: float, end_lr: float) -> Sweep:
    """Train `steps` batches at exponentially growing LRs with params' optimizer, clipping,
    augmentation, precision and model; stop early when the smoothed loss diverges."""
    cfg = params.train
    empty = Split(train.images[:0], train.labels[:0], train.classes, train.mean, train.std)  # nothing to validate
    t = setup(params, train, empty, ONE_PROCESS)  # one process whatever train.nproc: the global batch on one device
    # A fresh optimizer (momentum, weight decay and param groups as training builds them), its LR
    # driven by the ramp: every group at lr_at(step) times its ratio to train.lr, as the run's would be.
    optimizer = make_optimizer(t.model, cfg)
    ramp = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, steps, start_lr, end_lr) / cfg.lr)
    lrs, losses, smoothed, average, stopped = [], [], [], 0.0, "end of the sweep"
    # the run's step, driven by the ramp's optimizer and without the run's EMA
    ctx = dataclasses.replace(t.step_context(), optimizer=optimizer, scheduler=ramp, ema=None)
    progress = EpochProgress.start(t.images, t.generator)
    bar = tqdm(total=steps * cfg.batch_size, unit="img", unit_scale=True, desc="lr-find", leave=False, disable=None)
    with bar, warnings.catch_warnings():
        # As in training: GradScaler skips fp16 steps that overflowed, and torch then warns.
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        for step in range(steps):
            if progress.step == t.steps:  # the epoch's shuffle is used up: a new one
                progress = EpochProgress.start(t.images, t.generator)
            lr, seen = _head_lr(optimizer), progress.seen
            progress.sums.zero_()  # the sums now hold this one step's
            try:
                train_one_epoch(ctx, t.images, t.labels, cfg, progress.step + 1, progress, bar, lambda: False)
                loss = progress.sums[0].item() / (progress.seen - seen)  # note: a sync point each step
            except Diverged as exc:
                loss = exc.args[0]
            if not math.isfinite(loss):
                stopped = f"diverged: loss {loss} at lr {lr:.3g}"
                break
            lrs.append(lr)
            losses.append(loss)
            average = BETA * average + (1 - BETA) * loss
            smoothed.append(average / (1 - BETA ** len(losses)))  # bias-corrected: no start at 0
            if step > 0 and smoothed[-1] > DIVERGED * min(smoothed):
                stopped = f"diverged: smoothed loss above {DIVERGED:g}x its minimum at lr {lr:.3g}"
                break
    autocast = str(t.autocast).removeprefix("torch.") if t.autocast else "off"
    return Sweep(lrs, losses, smoothed, steps, start_lr, end_lr, cfg.batch_size, str(t.device), autocast, stopped)


def suggest(lrs: list[float], smoothed: list[float], skip: int = 0, rule: str = RULE) -> Suggestion:
    """Both rules on a smoothed loss curve, ignoring its first `skip` points.

    steepest: the LR of the most negative slope d(loss)/d(log lr) before the minimum (fastai's
    `steep`): where a step of LR buys the most; minimum: the minimum's LR / 10 (fastai's
    `minimum`): the loss's minimum is already at the edge of divergence, so back off a decade.
    """
    loss, log_lr = np.asarray(smoothed, dtype=float), np.log(np.asarray(lrs, dtype=float))
    if len(loss) <= skip:
        return Suggestion(None, rule, None, None, None)
    best = skip + int(np.argmin(loss[skip:]))
    steepest = None
    if best - skip >= 2:  # at least three points up to the minimum: a slope to compare
        slope = np.gradient(loss[skip:best + 1], log_lr[skip:best + 1])
        steepest = float(lrs[skip + int(np.argmin(slope))])
    minimum = float(lrs[best] / 10) if best > skip else None  # a minimum at the start: the loss never fell
    return Suggestion(steepest if rule == "steepest" else minimum, rule, steepest, minimum,
                      float(lrs[best]))


def suggestion_of(result: Sweep, rule: str = RULE) -> Suggestion:
    """`suggest` on a sweep, its first SKIP of the planned steps ignored."""
    return suggest(result.lrs, result.smoothed, int(SKIP * result.steps), rule)


def summary(suggestion: Suggestion) -> str:
    """The one line a user acts on (for a suggestion that exists)."""
    (other, other_lr), = ((name, getattr(suggestion, name)) for name in RULES if name != suggestion.rule)
    also = f"; {RULES[other]}: {other_lr:.3g}" if other_lr is not None else ""
    lr = f"{suggestion.lr:.3g}"
    return f"suggested train.lr: {lr} ({RULES[suggestion.rule]}{also}) — try: dvc exp run -S train.lr={lr}"


def write(out: Path, result: Sweep, suggestion: Suggestion) -> None:
    """The sweep's folder, replaced whole: TensorBoard events (`lr_find/*`, step = sweep step), the
    plot (PLOT) and the record (RECORD)."""
    _check_replaceable(out)
    with atomic_dir(out) as tmp, tensorboard.open_writer(tmp) as writer:
        for step, (lr, loss, smoothed) in enumerate(zip(result.lrs, result.losses, result.smoothed, strict=True)):
            writer.add_scalar("lr_find/loss", loss, step)
            writer.add_scalar("lr_find/smoothed_loss", smoothed, step)
            writer.add_scalar("lr_find/lr", lr, step)
        writer.add_text("lr_find/suggestion", summary(suggestion) if suggestion.lr else "no suggestion", 0)
        fig = plot(result, suggestion)
        fig.savefig(tmp / PLOT, dpi=120)
        writer.add_figure("lr_find/plot", fig, 0)  # closes the figure
        record = {"suggested_lr": suggestion.lr, "suggestion": asdict(suggestion), **asdict(result)}
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def plot(result: Sweep, suggestion: Suggestion):
    """Loss against LR (log scale): each batch's loss, the smoothed curve, both suggestions marked."""
    plt = tensorboard._pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(result.lrs, result.losses, color="lightgray", lw=0.8, label="batch loss")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", label="smoothed loss")
    for (name, label), colour in zip(RULES.items(), ("tab:red", "tab:green"), strict=True):
        lr = getattr(suggestion, name)
        if lr is not None:
            chosen = name == suggestion.rule
            ax.axvline(lr, color=colour, ls="-" if chosen else "--", lw=1.5 if chosen else 1,
                       label=f"{label}: {lr:.3g}{' (suggested)' if chosen else ''}")
    if result.smoothed:  # the smoothed curve in full; batch losses beyond it (a diverging tail) cut off
        ax.set_ylim(0.9 * min(*result.losses, *result.smoothed), 1.1 * max(result.smoothed))
    ax.set(xscale="log", xlabel="learning rate (train.lr)", ylabel="training loss",
           title=f"LR range test: {len(result.lrs)} steps of batch {result.batch_size}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run(params: Params, split: Path, out: Path, steps: int, start_lr: float, end_lr: float) -> Suggestion:
    """The whole command: load the processed training split, sweep, suggest, write `out`."""
    if not split.is_file():
        raise ReprotuneError(f"{split} not found: the LR range test trains on the processed splits; "
                             "run `dvc repro preprocess` first")
    _check_replaceable(out)  # before the sweep, not after it
    result = sweep(params, load_split(split), steps, start_lr, end_lr)
    suggestion = suggestion_of(result)
    write(out, result, suggestion)  # the plot shows what went wrong when there is no suggestion
    if suggestion.lr is None:
        raise ReprotuneError(f"no suggestion: the smoothed loss never fell before it diverged ({result.stopped}); "
                             f"lower --start-lr (the sweep is in {out})")
    return suggestion


def _check_replaceable(out: Path) -> None:
    """`out` is replaced whole: refuse a folder holding anything but an earlier sweep's output."""
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD).is_file():
        raise ReprotuneError(f"{out}: not an lr-find output folder (no {RECORD}), and it would be "
                             "replaced whole: choose another --out")
    if out.exists() and not out.is_dir():
        raise ReprotuneError(f"{out}: not a directory")


def _head_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR train.lr names: the new head's (the backbone's is backbone_lr_mult times it)."""
    return next(g["lr"] for g in optimizer.param_groups if g["name"].startswith("head/"))
