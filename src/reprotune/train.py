"""Fine-tuning: a plain loop over epochs and batches, with the whole dataset resident on the device.

Images stay uint8 on the device and are shuffled, cropped and flipped there in batches, so no
DataLoader workers, per-sample transforms or host-to-device copies sit in the loop. Loss and
accuracy accumulate as device tensors and are read once per epoch (one sync point per epoch).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tensorboardX import SummaryWriter
from tqdm import tqdm

from reprotune import tb
from reprotune.config import Params, TrainConfig
from reprotune.data import Split, augment, to_float
from reprotune.device import amp_dtype, select_device
from reprotune.errors import ReprotuneError
from reprotune.evaluate import loss_and_accuracy, predict
from reprotune.model import Classifier, apply_strategy, build_model

BAR_LOSS_EVERY = 20  # steps between progress-bar loss updates (each one waits for the device)


@dataclass
class FitResult:
    """What a fine-tuning run produced: the best-validation model and its record."""

    model: Classifier  # weights of the best validation epoch, on CPU, eval mode
    metrics: dict  # metrics/train.json
    history: list[dict] = field(default_factory=list)  # one row per epoch


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer over trainable parameters only (frozen ones get no state, no decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier on `train.lr` after `step` optimizer steps (the scheduler's formula)."""
    if cfg.scheduler == "cosine":  # half a cosine from lr down to 0 over the whole run
        return 0.5 * (1 + math.cos(math.pi * min(step, cfg.epochs * steps_per_epoch)
                                   / (cfg.epochs * steps_per_epoch)))
    if cfg.scheduler == "step":  # multiply by step_gamma every step_epochs epochs
        return cfg.step_gamma ** ((step // steps_per_epoch) // cfg.step_epochs)
    return 1.0


def train_one_epoch(model: Classifier, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                    autocast: torch.dtype | None, generator: torch.Generator, steps: int,
                    bar: tqdm) -> tuple[float, float]:
    """One pass of `steps` full batches over a fresh shuffle; returns (mean loss, accuracy)."""
    model.train()
    device = images.device
    order = torch.randperm(len(images), device=device, generator=generator)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for step in range(steps):
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        x = to_float(augment(images[idx], cfg.random_crop, cfg.hflip, generator))
        y = labels[idx]
        with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        seen += len(idx)
        bar.update(len(idx))
        if not bar.disable and (step + 1) % BAR_LOSS_EVERY == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", refresh=False)  # note: a sync point
    # note: .item() is the epoch's one CPU-GPU sync point
    return loss_sum.item() / seen, correct.item() / seen


def finetune(params: Params, train: Split, val: Split, writer: SummaryWriter) -> FitResult:
    """Fine-tune per `params` on `train`, validate each epoch on `val`, keep the best epoch."""
    cfg = params.train
    device = select_device(cfg.device)
    autocast = amp_dtype(cfg.amp, device)
    torch.manual_seed(params.seed)  # the new head's initial weights
    model = build_model(params.model, len(train.classes), train.mean, train.std).to(device)
    apply_strategy(model, cfg.strategy, cfg.unfreeze_from)

    images, labels = train.images.to(device), train.labels.to(device)
    val_images, val_labels = val.images.to(device), val.labels
    # Full batches only: a trailing batch of one image would break BatchNorm, and every
    # image is still seen across epochs because each epoch reshuffles.
    steps = max(1, len(images) // cfg.batch_size)
    per_epoch = min(len(images), steps * cfg.batch_size)  # images trained on each epoch
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
    generator = torch.Generator(device).manual_seed(params.seed)
    _log_setup(writer, params, model, train, device, autocast)

    history, best_acc, best_state = [], -1.0, None
    started = time.perf_counter()
    train_seconds = 0.0
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        with tqdm(total=per_epoch, unit="img", unit_scale=True,
                  desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=None) as bar, \
                warnings.catch_warnings():
            # GradScaler skips the optimizer step when fp16 gradients overflow (always at its first,
            # too-high scale) and torch then warns the scheduler stepped "first". Expected under AMP.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            train_loss, train_acc = train_one_epoch(model, optimizer, scheduler, scaler, images, labels,
                                                    cfg, autocast, generator, steps, bar)
        seconds = time.perf_counter() - epoch_start
        train_seconds += seconds
        if not math.isfinite(train_loss):
            raise ReprotuneError(f"training loss became {train_loss} in epoch {epoch}: lower train.lr "
                                 "or set train.grad_clip")
        val_loss, val_acc = loss_and_accuracy(predict(model, val_images, cfg.batch_size, autocast), val_labels)
        row = {"epoch": epoch, "step": epoch * steps, "lr": scheduler.get_last_lr()[0],
               "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
               "seconds": seconds, "images_per_second": per_epoch / seconds}
        history.append(row)
        _log_epoch(writer, model, row, params.log.histograms)
        tqdm.write(f"epoch {epoch}/{cfg.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                   f"val loss {val_loss:.4f} acc {val_acc:.4f}  {row['images_per_second']:.0f} img/s")
        if best_state is None or val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    last = history[-1]
    metrics = {"best_val_acc": best_acc, "best_epoch": best_epoch, "final_val_acc": last["val_acc"],
               "final_val_loss": last["val_loss"], "final_train_loss": last["train_loss"],
               "final_train_acc": last["train_acc"], "epochs": cfg.epochs,
               "train_seconds": time.perf_counter() - started,
               "images_per_second": cfg.epochs * per_epoch / train_seconds}
    if params.log.graph:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and shape notices
            writer.add_graph(model.eval(), to_float(val_images[:2]))
    model.load_state_dict(best_state)
    tb.log_hparams(writer, _hparams(params), {f"hparam/{k}": float(metrics[k]) for k in
                                              ("best_val_acc", "final_val_loss", "final_train_loss")})
    return FitResult(model.cpu().eval(), metrics, history)


def _log_setup(writer: SummaryWriter, params: Params, model: Classifier, train: Split,
               device: torch.device, autocast: torch.dtype | None) -> None:
    """What the run is: device, precision, trainable parameters, an augmented sample batch."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    writer.add_text("run/setup", f"device {device}, autocast {autocast or 'off'}, strategy "
                    f"{params.train.strategy}: {trainable:,} of {total:,} parameters train, "
                    f"frozen: {', '.join(model.frozen) or 'nothing'}", 0)
    count = params.log.images
    if count:
        # A separate generator, so logging never shifts the training run's random stream.
        sample_gen = torch.Generator(train.images.device).manual_seed(params.seed + 1)
        batch = augment(train.images[:count], params.train.random_crop, params.train.hflip, sample_gen)
        tb.log_samples(writer, "train/augmented_batch", batch, train.labels, train.classes, count)


def _log_epoch(writer: SummaryWriter, model: Classifier, row: dict, histograms: bool) -> None:
    step = row["step"]
    for split in ("train", "val"):
        writer.add_scalar(f"{split}/loss", row[f"{split}_loss"], step)
        writer.add_scalar(f"{split}/acc", row[f"{split}_acc"], step)
    writer.add_scalar("train/lr", row["lr"], step)
    writer.add_scalar("train/images_per_second", row["images_per_second"], step)
    writer.add_scalar("train/epoch", row["epoch"], step)
    if histograms:
        tb.log_histograms(writer, model, step)
    writer.flush()


def _hparams(params: Params) -> dict:
    """seed, model.* and train.* as flat name -> scalar pairs."""
    flat = {"seed": params.seed}
    for section in ("model", "train"):
        for key, value in getattr(params, section).model_dump().items():
            flat[f"{section}.{key}"] = value
    return flat
