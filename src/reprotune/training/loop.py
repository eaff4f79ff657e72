"""Fine-tuning: a plain loop over epochs and batches, with the whole dataset resident on the device.

Images stay uint8 on the device and are shuffled, cropped, flipped, rotated and colour-jittered
there in batches, so no DataLoader workers, per-sample transforms or host-to-device copies sit in
the loop. Loss, accuracy and gradient statistics accumulate as device tensors and are read once per
epoch (one sync point per epoch). Every epoch ends in a checkpoint, so a killed run resumes where it
stopped.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tensorboardX import SummaryWriter
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from reprotune.config import Params, TrainConfig
from reprotune.data.splits import Split, to_float
from reprotune.errors import Interrupted, ReprotuneError
from reprotune.tracking import tensorboard
from reprotune.training.augment import augment
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.device import amp_dtype, check_deterministic, select_device, set_deterministic
from reprotune.training.distributed import ONE_PROCESS, Group
from reprotune.training.feed import DiskImages, HostImages, epoch_batches, place
from reprotune.training.model import Classifier, apply_strategy, build_model, frozen_stages
from reprotune.training.optim import make_optimizer, make_scheduler
from reprotune.training.scoring import batched_logits, loss_and_accuracy

# Steps between reads of the running loss: each one waits for the device (a sync point), and it
# both updates the progress bar and catches a diverged loss within this many steps, before NaN
# weights train on (and poison the EMA) for the rest of the epoch.
CHECK_EVERY = 20
GRAD_NORM_EVERY = 10  # without clipping, the logged gradient norm is sampled every this many steps
PREDICTION_IMAGES = 16  # validation images shown with their predictions each epoch
CHECKPOINT_FORMAT = "reprotune.checkpoint/2"  # RunState + the parts' state dicts

# The training loss: (logits, the batch's input images, labels) -> scalar. Plain cross-entropy, or
# distillation from a teacher that sees the same images (`distillation`).
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FitResult:
    """What a fine-tuning run produced: the best epoch's model and the run's record."""

    model: Classifier  # weights of the best epoch (EMA weights when EMA is on), CPU, eval mode
    metrics: dict  # metrics/train.json
    history: list[dict] = field(default_factory=list)  # one row per epoch


def clip_gradients(params: list[torch.nn.Parameter], cfg: TrainConfig, measure: bool = True
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Clip (unscaled) gradients by norm or value; return (norm before clipping, whether it clipped).

    Without clipping the norm is only for the log: with `measure` False it is skipped (None, None),
    saving a pass over every gradient (~2 ms a step for ResNet18 on 2 CPU cores).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if cfg.grad_clip == 0 and not measure:
        return None, None
    norm = torch.nn.utils.get_total_norm(grads)
    if cfg.grad_clip == 0:
        return norm, torch.zeros((), dtype=torch.bool, device=norm.device)
    if cfg.grad_clip_mode == "norm":
        fired = norm > cfg.grad_clip
        # On the CPU reading `fired` costs nothing, and skips a pass over every gradient when the
        # norm is within bounds; on a GPU it would be a sync point, so scale unconditionally there.
        if norm.device.type != "cpu" or fired:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm)
        return norm, fired
    fired = torch.stack([g.abs().amax() for g in grads]).amax() > cfg.grad_clip
    torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
    return norm, fired


@dataclass
class EpochProgress:
    """Where an epoch stands: its shuffle, the next step and device-side sums read once at the end."""

    order: torch.Tensor  # the epoch's permutation of the training images
    sums: torch.Tensor  # (5,) loss * images, correct, finite grad norms summed, their count, clipped steps
    step: int = 0
    seen: int = 0
    seconds: float = 0.0

    @classmethod
    def start(cls, images: torch.Tensor, generator: torch.Generator) -> EpochProgress:
        order = torch.randperm(len(images), device=images.device, generator=generator)
        return cls(order, torch.zeros(5, device=images.device))

    @classmethod
    def restore(cls, saved: dict, device: torch.device) -> EpochProgress:
        """A paused epoch from a checkpoint (read onto the CPU), its tensors on the training device:
        the sums must live where the losses they add up are computed."""
        return cls(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in saved.items()})

    def to_dict(self) -> dict:
        return {"order": self.order, "sums": self.sums, "step": self.step, "seen": self.seen, "seconds": self.seconds}

    def summary(self, steps: int, scaler: torch.amp.GradScaler) -> dict[str, float]:
        """The epoch's averages. note: .tolist() is the epoch's one CPU-GPU sync point."""
        loss, correct, norms, finite, clipped = self.sums.tolist()
        return {"train_loss": loss / self.seen, "train_acc": correct / self.seen, "grad_norm": norms / max(1.0, finite),
                "clip_fraction": clipped / steps, "loss_scale": scaler.get_scale() if scaler.is_enabled() else 1.0}


def augmented(images: torch.Tensor, cfg: TrainConfig, generator: torch.Generator,
              part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """uint8 `images` augmented as `cfg` says: the model's float32 input. The loop, the trial step
    and the logged sample batch all come this way, so none of them can miss a setting."""
    return augment(images, cfg.random_crop, cfg.hflip, generator, part, cfg.rotation, cfg.color_jitter,
                   cfg.padding_mode)


class Diverged(Exception):
    """The running training loss is no longer finite."""


@dataclass
class StepContext:
    """What an optimizer step works with, apart from the data: the model and what updates it."""

    model: torch.nn.Module  # what the step calls: wrapped for DDP or compiled, if so
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped after every optimizer step
    scaler: torch.amp.GradScaler  # enabled for fp16 autocast only
    generator: torch.Generator  # the augmentation's draws, in step on every rank
    ema: AveragedModel | None = None  # updated after every step
    autocast: torch.dtype | None = None
    group: Group = ONE_PROCESS
    criterion: Criterion | None = None  # None: cross-entropy with train.label_smoothing


def train_one_epoch(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, steps: int,
                    progress: EpochProgress, bar: tqdm, stop: Callable[[], bool]) -> bool:
    """Run the epoch's remaining steps (to `steps`); return False if `stop()` asked to pause after a step.

    Each step takes the next global batch of the epoch's shuffle; this rank trains on its slice.
    The loss is `ctx.criterion`'s, cross-entropy (with cfg.label_smoothing) by default. Raises
    Diverged within CHECK_EVERY steps of the loss turning NaN or infinite. A step that
    GradScaler skipped because fp16 gradients overflowed is not that: its loss was finite.
    """
    model, optimizer, scheduler, scaler, ema, group = (ctx.model, ctx.optimizer, ctx.scheduler, ctx.scaler,
                                                       ctx.ema, ctx.group)
    model.train()
    device = images.device
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum, correct, norm_sum, finite_norms, clipped = progress.sums.unbind()  # views: summed in place
    criterion = ctx.criterion or cross_entropy(cfg.label_smoothing)
    with epoch_batches(images, progress.order, range(progress.step, steps), cfg.batch_size, group.part) as stream:
        for idx, pixels in stream:
            global_batch = min(cfg.batch_size, len(progress.order) - progress.step * cfg.batch_size)
            x = augmented(pixels, cfg, ctx.generator, (group.rank, group.world))
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            with torch.autocast(device.type, dtype=ctx.autocast) if ctx.autocast else contextlib.nullcontext():
                logits = model(x)
                loss = criterion(logits, x, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip and measure the true gradients, not fp16-scaled ones
            norm, fired = clip_gradients(params, cfg, measure=progress.step % GRAD_NORM_EVERY == 0)
            scaler.step(optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            if norm is not None:
                finite = torch.isfinite(norm)
                norm_sum += torch.where(finite, norm, 0.0)
                finite_norms += finite
                clipped += fired
            loss_sum += loss.detach() * len(idx)  # this rank's share; the ranks' sums add up at the epoch's end
            correct += (logits.argmax(1) == y).sum()
            progress.seen += global_batch  # images trained by all ranks together
            progress.step += 1
            bar.update(global_batch)
            if progress.step % CHECK_EVERY == 0:
                # The running sum of losses is finite exactly while every loss so far was. Under DDP
                # the ranks agree on it (one tiny all-reduce), so that all of them stop at this step.
                running = group.sum_(loss_sum.detach().clone().reshape(1)).item()  # note: a sync point
                if not math.isfinite(running):
                    raise Diverged(running)
                bar.set_postfix(loss=f"{running / progress.seen:.4f}", refresh=False)
            if stop() and progress.step < steps:
                return False
    return True


def cross_entropy(label_smoothing: float) -> Criterion:
    """The fine-tuning loss: cross-entropy against the labels."""
    return lambda logits, images, labels: F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def distillation(teacher: torch.nn.Module, weight: float, temperature: float, label_smoothing: float) -> Criterion:
    """Knowledge distillation (Hinton et al. 2015): (1 - weight) * cross-entropy + weight * T^2 *
    KL(teacher || student) at temperature T. T^2 keeps the soft term's gradients on the scale of the
    hard one's as T grows. The teacher (eval mode, frozen) sees the same augmented images."""
    teacher.eval().requires_grad_(False)
    hard = cross_entropy(label_smoothing)

    def loss(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft_targets = F.log_softmax(teacher(images).float() / temperature, 1)
        soft = F.kl_div(F.log_softmax(logits.float() / temperature, 1), soft_targets, log_target=True,
                        reduction="batchmean")
        return (1 - weight) * hard(logits, images, labels) + weight * temperature ** 2 * soft

    return loss


@contextlib.contextmanager
def pause_on_ctrl_c() -> Iterator[Callable[[], bool]]:
    """Yield `requested()`: the first Ctrl-C asks the loop to pause after its current step (to
    checkpoint); a second one interrupts at once. Only the main thread can take signals."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        tqdm.write("interrupt: saving a checkpoint after this step (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def peak_memory_mib() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it restarts at exec)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024
    return float("nan")  # not Linux


def trial_step(model: Classifier, images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
               autocast: torch.dtype | None) -> None:
    """One forward and backward pass as the loop takes them, on a copy of the model and 2 images,
    leaving the model and every random stream as they were."""
    device = images.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = copy.deepcopy(model).train()
        x = augmented(images[:2], cfg, torch.Generator(device))
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            loss = F.cross_entropy(probe(x), labels[:2], label_smoothing=cfg.label_smoothing)
        loss.backward()


def training_flops_per_image(model: Classifier, image_size: int, device: torch.device) -> float:
    """FLOPs of one forward + backward pass per image, counted by torch on a copy of the model."""
    probe = copy.deepcopy(model).eval()  # eval: counting must not touch BatchNorm statistics
    x = torch.rand(2, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        probe(x).sum().backward()
    return counter.get_total_flops() / 2


@dataclass
class RunState:
    """Where a run stands, as a checkpoint holds it (next to the model's, optimizer's, scheduler's,
    scaler's and EMA's own state dicts and the random states): saved after every epoch, and in the
    middle of one (`paused`) on Ctrl-C."""

    epoch: int = 0  # the last complete epoch (0: none yet)
    history: list[dict] = field(default_factory=list)  # one row per epoch (rank 0)
    best_epoch: int = 0  # the epoch whose weights are kept
    best_score: float = -math.inf  # its val_acc, or -val_loss (train.early_stop_metric)
    best_weights: dict | None = None  # its state dict (rank 0; the EMA's when EMA is on)
    stale_epochs: int = 0  # epochs since the best one
    train_seconds: float = 0.0  # in training steps, summed over every session
    paused: dict | None = None  # an interrupted epoch (EpochProgress.to_dict)


@dataclass
class Training:
    """What the loop works with, built once by `setup`: the model and what updates it, the data on
    the device, and the facts of the run that do not change from epoch to epoch."""

    model: Classifier
    trained: torch.nn.Module  # what the loop calls: the model, wrapped for DDP and compiled if asked
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    generator: torch.Generator  # shuffles and augmentation, in step on every rank
    images: torch.Tensor | HostImages | DiskImages  # uint8: on the device, in (pinned) host memory, or on disk
    labels: torch.Tensor
    val_images: torch.Tensor  # on the device, or (pinned) on the host
    val_labels: torch.Tensor  # on the CPU, where validation's logits land
    device: torch.device
    autocast: torch.dtype | None
    steps: int  # optimizer steps per epoch
    per_epoch: int  # images trained on per epoch, all ranks together
    flops_per_image: float  # forward + backward (rank 0)
    group: Group
    criterion: Criterion

    def step_context(self) -> StepContext:
        return StepContext(self.trained, self.optimizer, self.scheduler, self.scaler, self.generator, self.ema,
                           self.autocast, self.group, self.criterion)

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights validated and kept: the EMA's when EMA is on."""
        return self.ema.module if self.ema is not None else self.model


def finetune(params: Params, train: Split, val: Split, checkpoints: Checkpoints,
             group: Group = ONE_PROCESS, start: Classifier | None = None,
             teacher: torch.nn.Module | None = None) -> FitResult | None:
    """Fine-tune per `params` on `train`, validate each epoch on `val`, resume if interrupted.

    `start`: the model to train (a pruned one, say) instead of a new one built from `params.model`.
    `teacher`: distill from it (`params.compress.distill`, `.temperature`) instead of plain cross-entropy.
    Under DDP every rank calls this; rank 0 alone validates, checkpoints and logs, and gets the
    result (the other ranks get None).
    """
    cfg, main = params.train, group.is_main
    t = setup(params, train, val, group, start, teacher)
    state = resume(t, checkpoints)
    with open_log(t, state, params, train, checkpoints) as writer, pausing(group) as stop_requested:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            if state.stale_epochs and state.stale_epochs >= cfg.early_stop_patience > 0:
                break  # early stopping
            thaw(t, cfg, epoch)
            progress = train_epoch(t, cfg, state, epoch, stop_requested, checkpoints)
            val_logits, val_loss, val_acc = validate(t, cfg)
            keep_best(t, state, epoch, val_acc if cfg.early_stop_metric == "val_acc" else -val_loss)
            state.epoch, state.train_seconds = epoch, state.train_seconds + progress.seconds
            if main:
                row = epoch_row(t, progress, epoch, val_loss, val_acc)
                state.history.append(row)
                _log_epoch(writer, t.model, row, params, val, val_logits)
                tqdm.write(f"epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                           f"  val loss {val_loss:.4f} acc {val_acc:.4f}  {row['images_per_second']:.0f} img/s")
            checkpoint = snapshot(t, state)  # collective under DDP: every rank takes part
            if main:
                checkpoints.save(checkpoint)
        if not main:
            return None
        metrics = _metrics(state, cfg, t.per_epoch, t.flops_per_image, group.world)
        _log_end(writer, params, t.model, t.val_images, metrics)
    t.model.load_state_dict(state.best_weights)
    return FitResult(t.model.cpu().eval(), metrics, state.history)


def setup(params: Params, train: Split, val: Split, group: Group, start: Classifier | None = None,
          teacher: torch.nn.Module | None = None) -> Training:
    """Device, model, strategy, data, optimizer, schedule, scaler, EMA and generator, in the order
    the random streams expect (the head's initial weights come first)."""
    cfg = params.train
    set_deterministic(cfg.deterministic)  # before the run's first CUDA work
    try:
        device = select_device(cfg.device, group.local_rank if group.distributed else None)
    except ReprotuneError as exc:
        raise params.error(str(exc)) from None
    autocast = amp_dtype(cfg.amp, device)
    torch.manual_seed(params.seed)  # the new head's initial weights (the same on every rank), and dropout
    model = (copy.deepcopy(start) if start is not None else
             build_model(params.model, len(train.classes), train.mean, train.std)).to(device)
    criterion = cross_entropy(cfg.label_smoothing) if teacher is None else distillation(
        copy.deepcopy(teacher).to(device), params.compress.distill, params.compress.temperature, cfg.label_smoothing)
    if group.distributed:
        torch.manual_seed(params.seed + 1000 * (group.rank + 1))  # each rank its own dropout masks
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    apply_strategy(model, frozen_stages(cfg.strategy, cfg.unfreeze_from, cfg.unfreeze_after, 1))
    if cfg.deterministic:  # an op with no deterministic kernel here stops the run now, not mid-epoch
        check_deterministic(lambda: trial_step(model, train.images[:2].to(device), train.labels[:2].to(device),
                                               cfg, autocast))
    flops = training_flops_per_image(model, train.images.shape[-1], device) if group.is_main else 0.0
    if cfg.sync_bn and group.distributed:
        if device.type != "cuda":
            raise ReprotuneError("train.sync_bn needs CUDA (torch's SyncBatchNorm has no CPU kernel): "
                                 "set it to false to train on CPUs")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    images, val_images = place(train, val, cfg, device, announce=group.is_main)
    # Full global batches only: a trailing batch of one image would break BatchNorm, and every
    # image is still seen across epochs because each epoch reshuffles.
    steps = max(1, len(images) // cfg.batch_size)
    optimizer = make_optimizer(model, cfg)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) \
        if cfg.ema_decay else None
    return Training(
        model=model, trained=_trainable(model, cfg, group, device), optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg, steps),
        scaler=torch.amp.GradScaler(device.type, enabled=autocast == torch.float16), ema=ema,
        generator=torch.Generator(device).manual_seed(params.seed), images=images,
        labels=train.labels.to(device), val_images=val_images, val_labels=val.labels, device=device,
        autocast=autocast, steps=steps, per_epoch=min(len(images), steps * cfg.batch_size), flops_per_image=flops,
        group=group, criterion=criterion)


def resume(t: Training, checkpoints: Checkpoints) -> RunState:
    """The interrupted run's state, every part restored to where it stopped; else a fresh state.
    Rank 0 reads the checkpoint and sends it on: ranks on other machines have no file to read."""
    saved = t.group.share(checkpoints.resume() if t.group.is_main else None)
    if saved is None:
        return RunState()
    t.model.load_state_dict(saved["model"])
    t.optimizer.load_state_dict(saved["optimizer"])
    t.scheduler.load_state_dict(saved["scheduler"])
    t.scaler.load_state_dict(saved["scaler"])
    if t.ema is not None:
        t.ema.load_state_dict(saved["ema"])
    rng = saved["rng"]["ranks"][t.group.rank]
    torch.set_rng_state(rng["torch"])
    t.generator.set_state(saved["rng"]["generator"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], t.generator.device)
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ReprotuneError(f"{checkpoints.directory}: a checkpoint from another version of reprotune: "
                             f"remove that directory to start fresh")
    state = RunState(**saved["run"])
    if t.group.is_main:
        tqdm.write(f"resuming after epoch {state.epoch} from {checkpoints.directory}")
    return state


def snapshot(t: Training, state: RunState) -> dict:
    """A checkpoint: the run's state and every part's, enough to continue exactly here. Collective
    under DDP: each rank's own random state (its dropout stream) is gathered for rank 0 to save."""
    cuda = t.generator.device.type == "cuda"
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(t.generator.device) if cuda else None}
    run = {f.name: getattr(state, f.name) for f in fields(state)}  # shallow: no copies of the best weights
    return {"format": CHECKPOINT_FORMAT, "run": run, "model": t.model.state_dict(),
            "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(), "ema": t.ema.state_dict() if t.ema is not None else None,
            "rng": {"ranks": t.group.gather(rng), "generator": t.generator.get_state()}}


@contextlib.contextmanager
def open_log(t: Training, state: RunState, params: Params, train: Split, checkpoints: Checkpoints
             ) -> Iterator[SummaryWriter | None]:
    """Rank 0's live TensorBoard writer (None on other ranks). On resume, TensorBoard drops the
    interrupted session's events from the first step not yet checkpointed, so none appear twice."""
    if not t.group.is_main:
        yield None
        return
    resumed = state.epoch > 0 or state.paused is not None
    purge_step = state.epoch * t.steps + 1 if resumed else None
    with tensorboard.open_writer(checkpoints.logdir, purge_step=purge_step) as writer:
        if not resumed:
            _log_setup(writer, params, t.model, train, t.device, t.autocast, t.flops_per_image, t.group.world)
        yield writer


def pausing(group: Group) -> contextlib.AbstractContextManager[Callable[[], bool]]:
    """Ctrl-C handling. In one process the first Ctrl-C pauses after the current step (to
    checkpoint). Under DDP a Ctrl-C reaches every rank at a different step, and pausing needs them
    in step: the ranks stop at once and a rerun resumes from the last complete epoch."""
    return pause_on_ctrl_c() if not group.distributed else contextlib.nullcontext(lambda: False)


def thaw(t: Training, cfg: TrainConfig, epoch: int) -> None:
    """Gradual unfreezing: the stages frozen in `epoch`; DDP is wrapped again when they change."""
    frozen = frozen_stages(cfg.strategy, cfg.unfreeze_from, cfg.unfreeze_after, epoch)
    if frozen == t.model.frozen:
        return
    apply_strategy(t.model, frozen)
    if t.group.distributed:  # DDP hooks only the parameters that train: wrap again
        t.trained = _trainable(t.model, cfg, t.group, t.device)
    if t.group.is_main:
        tqdm.write(f"epoch {epoch}: frozen now {', '.join(frozen) or 'nothing'}")


def train_epoch(t: Training, cfg: TrainConfig, state: RunState, epoch: int, stop_requested: Callable[[], bool],
                checkpoints: Checkpoints) -> EpochProgress:
    """One epoch of training (the rest of a paused one on resume), timed to the end of its GPU work.

    Ctrl-C: checkpoint mid-epoch, raise Interrupted. A loss that is no longer finite: raise, the
    last epoch's checkpoint kept.
    """
    progress = EpochProgress.restore(state.paused, t.device) if state.paused \
        else EpochProgress.start(t.images, t.generator)
    state.paused = None
    started = time.perf_counter()
    with tqdm(total=t.per_epoch, initial=progress.seen, unit="img", unit_scale=True, desc=f"epoch {epoch}/{cfg.epochs}",
              leave=False, disable=None if t.group.is_main else True) as bar, warnings.catch_warnings():
        # GradScaler skips the optimizer step when fp16 gradients overflow (always at its first,
        # too-high scale); torch then warns the scheduler stepped "first". Expected.
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        try:
            finished = train_one_epoch(t.step_context(), t.images, t.labels, cfg, t.steps, progress, bar,
                                       stop_requested)
        except Diverged as exc:
            raise _diverged(exc.args[0], epoch, f"step {progress.step} of {t.steps}", checkpoints) from None
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)  # the epoch's time must include its queued GPU work
    progress.seconds += time.perf_counter() - started
    if not finished:
        state.paused = progress.to_dict()
        checkpoints.save(snapshot(t, state))
        raise Interrupted(f"interrupted in epoch {epoch} after step {progress.step} of {t.steps}: "
                          f"checkpoint saved in {checkpoints.directory}; run the stage again to resume")
    t.group.sum_(progress.sums[:2])  # loss and correct counts over all ranks (grad norms are shared)
    loss = progress.sums[0].item() / progress.seen
    if not math.isfinite(loss):
        raise _diverged(loss, epoch, "its end", checkpoints)
    return progress


def validate(t: Training, cfg: TrainConfig) -> tuple[torch.Tensor | None, float, float]:
    """Rank 0 validates; every rank gets the loss and accuracy, to stop early at the same epoch."""
    logits = batched_logits(t.evaluated, t.val_images, cfg.batch_size, t.autocast) if t.group.is_main else None
    loss, acc = t.group.share(loss_and_accuracy(logits, t.val_labels) if t.group.is_main else None)
    return logits, loss, acc


def keep_best(t: Training, state: RunState, epoch: int, score: float) -> None:
    """Keep this epoch's weights if its score beats the best so far; count epochs without."""
    if state.best_epoch and not score > state.best_score:
        state.stale_epochs += 1
        return
    state.best_epoch, state.best_score, state.stale_epochs = epoch, score, 0
    if t.group.is_main:
        state.best_weights = {k: v.detach().clone() for k, v in t.evaluated.state_dict().items()}


def epoch_row(t: Training, progress: EpochProgress, epoch: int, val_loss: float, val_acc: float) -> dict:
    """The epoch's line in metrics/train_history.csv (and its TensorBoard scalars)."""
    seconds = progress.seconds
    row = {"epoch": epoch, "step": epoch * t.steps, **_lrs(t.optimizer), **progress.summary(t.steps, t.scaler),
           "val_loss": val_loss, "val_acc": val_acc, "seconds": seconds,
           "images_per_second": t.per_epoch / seconds,
           "achieved_tflops": t.flops_per_image * t.per_epoch / seconds / 1e12, "peak_rss_mb": peak_memory_mib()}
    return row


def _diverged(loss: float, epoch: int, where: str, checkpoints: Checkpoints) -> ReprotuneError:
    kept = f"the checkpoint of epoch {epoch - 1} is kept in {checkpoints.directory}" if epoch > 1 \
        else "no epoch had finished, so no checkpoint was kept"
    return ReprotuneError(f"training loss became {loss} in epoch {epoch} at {where}: lower train.lr "
                          f"or set train.grad_clip ({kept})")


def _trainable(model: Classifier, cfg: TrainConfig, group: Group, device: torch.device) -> torch.nn.Module:
    """The module the loop calls: `model`, wrapped in DDP when distributed, compiled if asked."""
    wrapped = group.wrap(model, device)
    return torch.compile(wrapped) if cfg.compile else wrapped


def _lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate now in effect for the head and for the backbone."""
    lrs = {group["name"].split("/")[0]: group["lr"] for group in optimizer.param_groups}
    return {"lr": lrs["head"], "lr_backbone": lrs.get("backbone", lrs["head"])}


def _metrics(state: RunState, cfg: TrainConfig, per_epoch: int, flops_per_image: float, processes: int) -> dict:
    history = state.history
    last, best_row = history[-1], history[state.best_epoch - 1]
    images_per_second = len(history) * per_epoch / state.train_seconds
    # Headline first: `dvc exp show` keeps the leftmost columns when the table is too wide.
    return {"best_val_acc": best_row["val_acc"], "images_per_second": images_per_second,
            "best_val_loss": best_row["val_loss"], "best_epoch": state.best_epoch,
            "final_val_acc": last["val_acc"], "final_val_loss": last["val_loss"],
            "final_train_loss": last["train_loss"], "final_train_acc": last["train_acc"],
            "epochs": len(history), "stopped_early": len(history) < cfg.epochs,
            "train_seconds": state.train_seconds, "processes": processes, "flops_per_image": flops_per_image,
            "achieved_tflops": flops_per_image * images_per_second / 1e12}


def _log_setup(writer: SummaryWriter, params: Params, model: Classifier, train: Split,
               device: torch.device, autocast: torch.dtype | None, flops_per_image: float, processes: int) -> None:
    """What the run is: device, precision, trainable parameters, cost, an augmented sample batch."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    where = f"{processes} DDP processes ({params.train.batch_size // processes} images each per step) on " \
        if processes > 1 else ""
    writer.add_text("run/setup", f"{where}device {device}, autocast {autocast or 'off'}, strategy "
                    f"{params.train.strategy}: {trainable:,} of {total:,} parameters train, "
                    f"frozen: {', '.join(model.frozen) or 'nothing'}; {flops_per_image / 1e9:.3f} GFLOPs "
                    "per training image (forward + backward)", 0)
    tensorboard.log_layout(writer)
    count = params.log.images
    if count:
        # A separate generator, so logging never shifts the training run's random stream.
        sample_gen = torch.Generator(train.images.device).manual_seed(params.seed + 1)
        batch = augmented(train.images[:count], params.train, sample_gen)
        tensorboard.log_samples(writer, "train/augmented_batch", batch, train.labels, train.classes, count)


def _log_epoch(writer: SummaryWriter, model: Classifier, row: dict, params: Params, val: Split,
               val_logits: torch.Tensor) -> None:
    step = row["step"]
    for split in ("train", "val"):
        writer.add_scalar(f"{split}/loss", row[f"{split}_loss"], step)
        writer.add_scalar(f"{split}/acc", row[f"{split}_acc"], step)
    for name in ("lr", "lr_backbone", "grad_norm", "clip_fraction", "loss_scale", "images_per_second",
                 "achieved_tflops", "epoch"):
        writer.add_scalar(f"train/{name}", row[name], step)
    if params.log.histograms:
        tensorboard.log_histograms(writer, model, step)
    count = min(PREDICTION_IMAGES, params.log.images, len(val.labels))
    if count:
        tensorboard.log_predictions(writer, "val/predictions", val.images[:count], val.labels[:count],
                           val_logits[:count].argmax(1), val.classes, step)
    writer.flush()


def _log_end(writer: SummaryWriter, params: Params, model: Classifier, val_images: torch.Tensor,
             metrics: dict) -> None:
    """The model graph (once) and the run's hyperparameters with its final metrics (HPARAMS tab)."""
    if params.log.graph:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and shape notices
            writer.add_graph(model.eval(), to_float(val_images[:2].to(next(model.parameters()).device)))
    tensorboard.log_hparams(writer, _hparams(params), {f"hparam/{k}": float(metrics[k]) for k in
                                              ("best_val_acc", "final_val_loss", "final_train_loss")})


def _hparams(params: Params) -> dict:
    """seed, model.* and train.* as flat name -> scalar pairs (tuples as text)."""
    flat = {"seed": params.seed}
    for section in ("model", "train"):
        for key, value in getattr(params, section).model_dump().items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
