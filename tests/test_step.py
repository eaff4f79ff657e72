"""The training step and epoch on their own: clipping, the epoch's bookkeeping, divergence, pausing."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from fixtures import MEAN, STD
from reprotune.config import ModelConfig, TrainConfig
from reprotune.training import loop
from reprotune.training.augment import augment
from reprotune.training.loop import (
    Diverged,
    EpochProgress,
    StepContext,
    clip_gradients,
    pause_on_ctrl_c,
    train_one_epoch,
)
from reprotune.training.model import build_model


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


def test_a_paused_epoch_resumes_on_the_training_device():
    # A checkpoint is read onto the CPU. On a GPU the paused epoch's order and running sums must go
    # back to the GPU, or the first resumed step adds CUDA losses into CPU sums and fails (as every
    # rerun would, since the checkpoint still matches). On CPU this shows the restore moves every
    # tensor to the device it is handed, here PyTorch's "meta" device standing in for a GPU;
    # tests/test_gpu.py interrupts and resumes a real CUDA run.
    saved = {"order": torch.randperm(10), "sums": torch.zeros(5), "step": 3, "seen": 96, "seconds": 1.5}
    progress = loop.EpochProgress.restore(saved, torch.device("meta"))
    assert progress.order.device.type == "meta" and progress.sums.device.type == "meta"
    assert (progress.step, progress.seen, progress.seconds) == (3, 96, 1.5)


def _epoch(cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, stop=lambda: False, lr: float | None = None,
           progress: EpochProgress | None = None):
    """A model, its optimizer, and one call of train_one_epoch over `images`; what came out."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr if lr is None else lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    generator = torch.Generator().manual_seed(0)
    steps = len(images) // cfg.batch_size
    progress = progress or EpochProgress.start(images, generator)
    with tqdm(disable=True) as bar:
        finished = train_one_epoch(StepContext(model, optimizer, scheduler, scaler, generator), images, labels, cfg,
                                   steps, progress, bar, stop)
    return finished, progress, model, scheduler


def _data(n: int = 64):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator), torch.arange(n) % 10


def test_an_epoch_visits_every_image_once_and_sums_what_it_saw():
    images, labels = _data(64)
    cfg = TrainConfig(batch_size=16, grad_clip=1.0, random_crop=0, hflip=False)
    finished, progress, _, scheduler = _epoch(cfg, images, labels)
    assert finished and progress.step == 4 and progress.seen == 64
    assert sorted(progress.order.tolist()) == list(range(64))  # a permutation: each image once
    assert scheduler.last_epoch == 4  # the schedule advanced once per optimizer step
    loss_sum, correct, norm_sum, norms, clipped = progress.sums.tolist()
    assert 64 * 1.5 < loss_sum < 64 * 4  # losses of a fresh 10-class head (ln 10 = 2.3) times images
    assert 0 <= correct <= 64 and correct == int(correct)
    assert norms == 4 and norm_sum > 0 and clipped <= 4  # clipping on: every step's norm is measured
    row = progress.summary(4, torch.amp.GradScaler("cpu", enabled=False))
    assert row["train_loss"] == pytest.approx(loss_sum / 64) and row["train_acc"] == pytest.approx(correct / 64)
    assert row["grad_norm"] == pytest.approx(norm_sum / 4) and row["clip_fraction"] == clipped / 4
    assert row["loss_scale"] == 1.0


def test_without_clipping_the_gradient_norm_is_sampled_every_tenth_step():
    images, labels = _data(21 * 4)
    _, progress, _, _ = _epoch(TrainConfig(batch_size=4, grad_clip=0), images, labels)
    assert progress.step == 21 and progress.sums[3].item() == 3  # steps 0, 10 and 20
    assert progress.sums[4].item() == 0  # nothing clipped
    row = progress.summary(21, torch.amp.GradScaler("cpu", enabled=False))
    assert row["grad_norm"] == pytest.approx(progress.sums[2].item() / 3) and row["clip_fraction"] == 0


def test_one_measured_norm_is_its_own_average():
    progress = EpochProgress(torch.arange(4), torch.tensor([8.0, 2.0, 3.5, 1.0, 0.0]), step=1, seen=4)
    row = progress.summary(1, torch.amp.GradScaler("cpu", enabled=False))
    assert row == {"train_loss": 2.0, "train_acc": 0.5, "grad_norm": 3.5, "clip_fraction": 0.0, "loss_scale": 1.0}
    enabled = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert progress.summary(1, enabled)["loss_scale"] == 1024.0


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_clipping_fires_only_above_the_threshold_and_leaves_smaller_gradients_bitwise(mode):
    weight = torch.nn.Parameter(torch.zeros(2))
    cfg = TrainConfig(grad_clip=1.0, grad_clip_mode=mode)
    weight.grad = torch.tensor([0.6, 0.8]) if mode == "norm" else torch.tensor([1.0, -0.5])  # exactly at 1.0
    norm, fired = clip_gradients([weight], cfg)
    assert norm.item() == pytest.approx(1.0 if mode == "norm" else math.sqrt(1.25)) and not fired.item()
    small = torch.tensor([0.3, -0.4])
    weight.grad = small.clone()
    _, fired = clip_gradients([weight], cfg)
    assert not fired.item() and torch.equal(weight.grad, small)  # untouched, not rescaled by ~1
    weight.grad = torch.tensor([3.0, 4.0])
    norm, fired = clip_gradients([weight], cfg)
    assert norm.item() == 5.0 and fired.item()
    expected = [0.6, 0.8] if mode == "norm" else [1.0, 1.0]
    assert weight.grad.tolist() == pytest.approx(expected, rel=1e-5)


def test_without_clipping_the_norm_is_measured_only_when_asked():
    weight = torch.nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([3.0, 4.0])
    norm, fired = clip_gradients([weight], TrainConfig(grad_clip=0))  # measured by default
    assert norm.item() == 5.0 and fired.dtype == torch.bool and not fired.item()
    assert clip_gradients([weight], TrainConfig(grad_clip=0), measure=False) == (None, None)
    assert weight.grad.tolist() == [3.0, 4.0]


def test_a_pause_stops_after_the_current_step_and_continues_where_it_stopped():
    images, labels = _data(64)
    cfg = TrainConfig(batch_size=16, random_crop=0, hflip=False)
    calls = []
    finished, progress, _, _ = _epoch(cfg, images, labels, stop=lambda: calls.append(1) or len(calls) >= 2)
    assert not finished and progress.step == 2 and progress.seen == 32
    whole, _, _, _ = _epoch(cfg, images, labels, progress=progress)
    assert whole and progress.step == 4 and progress.seen == 64


def test_a_pause_asked_at_the_last_step_finishes_the_epoch():
    images, labels = _data(32)
    finished, progress, _, _ = _epoch(TrainConfig(batch_size=16), images, labels, stop=lambda: True)
    assert progress.step == 1 and not finished
    finished, progress, _, _ = _epoch(TrainConfig(batch_size=32), images, labels, stop=lambda: True)
    assert finished and progress.step == 1  # nothing left to pause for


def test_a_diverging_step_is_caught_at_the_next_check(monkeypatch):
    monkeypatch.setattr(loop, "CHECK_EVERY", 3)
    images, labels = _data(40)
    progress = EpochProgress.start(images, torch.Generator().manual_seed(0))
    with pytest.raises(Diverged) as caught:
        _epoch(TrainConfig(batch_size=4, grad_clip=0, lr=1.0), images, labels, lr=1e12, progress=progress)
    assert not math.isfinite(caught.value.args[0]) and progress.step == 3  # the first check, not later
    finished, progress, _, _ = _epoch(TrainConfig(batch_size=4, lr=0.01), images, labels)  # a sane LR: no alarm
    assert finished and progress.step == 10


def test_the_first_ctrl_c_asks_to_pause_and_the_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under a shell's `&`
    with pause_on_ctrl_c() as requested:
        assert not requested()
        os.kill(os.getpid(), signal.SIGINT)
        assert requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # put back as it was


def _replay(model, images, labels, cfg: TrainConfig, seed: int, autocast=None):
    """What an epoch at learning rate 0 must sum, computed here step by step: the same shuffle and
    augmentation draws from a generator seeded alike, each batch through the (unchanging) model in
    training mode, the loss with the same smoothing, the gradient norm before clipping."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    loss_sum, correct, norms = 0.0, 0, []
    for step in range(len(images) // cfg.batch_size):
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        x = augment(images[idx], cfg.random_crop, cfg.hflip, generator, rotation=cfg.rotation,
                         jitter=cfg.color_jitter, mode=cfg.padding_mode)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        model.zero_grad()
        with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
            logits = model(x)
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=cfg.label_smoothing)
        loss.backward()
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        loss_sum += loss.item() * len(idx)
        correct += (logits.argmax(1) == labels[idx]).sum().item()
    return loss_sum, correct, norms


@pytest.mark.parametrize("channels_last, autocast", [(False, None), (True, None), (False, torch.bfloat16)])
def test_an_epoch_sums_exactly_what_its_steps_computed(channels_last, autocast):
    # At lr 0 the weights never move, so an independent replay of the same draws must give the same
    # sums: crops, flips, rotations, colour jitter, smoothing, channels_last and autocast all reach the step.
    images, labels = _data(48)
    cfg = TrainConfig(batch_size=16, grad_clip=0.5, random_crop=4, hflip=True, rotation=15, color_jitter=0.4,
                      label_smoothing=0.1, channels_last=channels_last, padding_mode="edge")
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(5)
    progress = EpochProgress.start(images, generator)
    with tqdm(disable=True) as bar:
        ctx = StepContext(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), generator,
                          autocast=autocast)
        assert train_one_epoch(ctx, images, labels, cfg, 3, progress, bar, lambda: False)
    loss_sum, correct, norms = _replay(reference, images, labels, cfg, seed=5, autocast=autocast)
    got_loss, got_correct, norm_sum, measured, clipped = progress.sums.tolist()
    tolerance = 1e-2 if autocast else 1e-4
    assert got_loss == pytest.approx(loss_sum, rel=tolerance) and got_correct == correct
    assert measured == 3 and norm_sum == pytest.approx(sum(n.item() for n in norms), rel=tolerance)
    assert clipped == sum(n.item() > 0.5 for n in norms)


def test_a_run_of_epochs_uses_only_its_own_generator():
    # The shuffle and the augmentation draw from the run's generator, never the global one: two
    # epochs from equal generators are equal, whatever the global random state in between.
    images, labels = _data(32)
    orders = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        orders.append(EpochProgress.start(images, torch.Generator().manual_seed(9)).order)
        torch.manual_seed(global_seed + 10)
        orders.append(augment(images[:8], 4, True, torch.Generator().manual_seed(9)))
    assert torch.equal(orders[0], orders[2]) and torch.equal(orders[1], orders[3])


def test_an_ema_follows_the_trained_weights():
    images, labels = _data(32)
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    before = copy.deepcopy(ema.module.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(0)
    with tqdm(disable=True) as bar:
        ctx = StepContext(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), generator, ema=ema)
        train_one_epoch(ctx, images, labels, TrainConfig(batch_size=16), 2, EpochProgress.start(images, generator), bar,
                        lambda: False)
    after = ema.module.state_dict()
    assert ema.n_averaged.item() == 2  # one update per step
    assert not torch.equal(after["net.fc.1.weight"], before["net.fc.1.weight"])
    assert not torch.equal(after["net.fc.1.weight"], model.state_dict()["net.fc.1.weight"])  # an average


def test_fp16_overflow_is_unscaled_skipped_and_reported():
    # GradScaler on the CPU with fp16 autocast: a first scale of 2**40 overflows; the step is
    # skipped (weights unchanged), its norm is not finite (not averaged, and not counted as clipped:
    # there is nothing to clip), and the scale halves.
    images, labels = _data(16)
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    generator = torch.Generator().manual_seed(0)
    progress = EpochProgress.start(images, generator)
    with tqdm(disable=True) as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = StepContext(model, optimizer, scheduler, scaler, generator, autocast=torch.float16)
        assert train_one_epoch(ctx, images, labels, TrainConfig(batch_size=16), 1, progress, bar, lambda: False)
    assert torch.equal(model.state_dict()["net.fc.1.weight"], before["net.fc.1.weight"])  # skipped
    loss_sum, _, norm_sum, finite_norms, clipped = progress.sums.tolist()
    assert math.isfinite(loss_sum) and norm_sum == 0 and finite_norms == 0 and clipped == 0
    row = progress.summary(1, scaler)
    assert row["loss_scale"] == 2.0**39 and row["grad_norm"] == 0.0
