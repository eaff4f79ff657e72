"""Structured pruning: remove whole channels, then win back the accuracy with a short fine-tune.

Torch-Pruning traces the model's dependency graph, so removing an output channel of one conv also
removes the matching input channel of every layer that reads it, across residual additions and
BatchNorm. The result is an ordinary, narrower ResNet18: dense kernels run it faster on any
hardware, unlike unstructured (zeroed-weight) sparsity. Recovery goes through finetune's loop,
checkpoints and logs (`train.finetune` with a `start` model), optionally distilling from the
unpruned model, for at least `compress.min_steps` optimizer steps whatever the dataset's size.
Before and after are measured the way they are served: ONNX Runtime on the CPU; a compressed model
that lost more than `compress.max_acc_drop` test accuracy is marked rejected (export leaves it out)
or, with `compress.gate: required`, fails the stage.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import TypedDict

import torch
import torch_pruning as tp
from tensorboardX import SummaryWriter
from torch.utils.flop_counter import FlopCounterMode

from reprotune.config import CompressConfig, Params
from reprotune.data.splits import Split, to_float
from reprotune.errors import ReprotuneError
from reprotune.export.formats import export_onnx
from reprotune.inference.runtime import onnx_runner
from reprotune.tracking import tensorboard
from reprotune.training.checkpoint import Checkpoints, run_key
from reprotune.training.loop import finetune
from reprotune.training.model import Classifier
from reprotune.training.scoring import batched_logits

# Channels kept per layer, a multiple of this: ONNX Runtime's CPU convolutions work on blocks of 8 (AVX2)
# or 16 (AVX-512) channels, and a width between blocks pays for the whole block. 16 measured 1.77x the
# unpruned throughput at 0.46x the FLOPs, 8 only 1.51x at 0.53x (ResNet18, ratio 0.2, 2-core EPYC).
ROUND_TO = 16
MAX_LAYER_RATIO = 0.9  # global pruning may empty a layer of low-magnitude channels; keep 10% of each
LATENCY_RUNS = 50  # batch-1 ONNX Runtime calls timed per model (median reported), on one thread
LATENCY_WARMUP = 5  # batch-1 calls before those, as the export stage makes (export/release.py)
THROUGHPUT_BATCH, THROUGHPUT_RUNS = 256, 10  # batch-256 calls timed per model (median reported)
PROFILE_KEYS = ("test_acc", "parameters", "flops", "size_mb", "latency_ms", "images_per_second")

IMPORTANCE = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "fpgm": lambda: tp.importance.FPGMImportance(p=2),
    "random": lambda: tp.importance.RandomImportance(),
}


class Profile(TypedDict):
    """One model's figures: `profile` (accuracy and size) and `speed` (timing) together."""

    test_acc: float
    parameters: int
    flops: float  # forward FLOPs per image
    size_mb: float  # its fp32 ONNX file
    latency_ms: float  # ONNX Runtime, batch 1, one thread, median
    images_per_second: float  # ONNX Runtime, batch 256, median


class Recovery(TypedDict, total=False):
    """The recovery fine-tune after pruning (`epochs` 0: none; the rest only when there was one)."""

    epochs: int
    best_epoch: int
    best_val_acc: float
    train_seconds: float
    steps: int


class CompressMetrics(TypedDict):
    """metrics/compress.json when the stage pruned (compress.ratio 0 writes only {"ratio": 0.0})."""

    test_acc: float  # the compressed model's
    acc_change: float  # against the unpruned model's test accuracy
    accepted: bool  # within compress.max_acc_drop
    flops_ratio: float
    speedup: float  # batch-256 throughput, compressed / unpruned
    ratio: float
    pruned_test_acc: float  # straight after pruning, before recovery
    before: Profile
    after: Profile
    recovery: Recovery


def prune(model: Classifier, cfg: CompressConfig, example: torch.Tensor, seed: int = 0) -> Classifier:
    """A copy of `model` with `cfg.ratio` of its prunable channels removed, ranked globally by
    `cfg.importance`; the head keeps its classes. `example`: a float input batch, for tracing."""
    pruned = copy.deepcopy(model).cpu().eval()
    torch.manual_seed(seed)  # the random criterion's draws
    pruner = tp.pruner.BasePruner(
        pruned, example.cpu(), importance=IMPORTANCE[cfg.importance](), pruning_ratio=cfg.ratio,
        global_pruning=True, max_pruning_ratio=MAX_LAYER_RATIO, round_to=ROUND_TO,
        ignored_layers=[pruned.net.fc])
    pruner.step()
    return pruned


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of finetune's loop, which takes full batches only."""
    return max(1, train_images // batch_size)


def recovery_epochs(cfg: CompressConfig, train_images: int, batch_size: int) -> int:
    """Epochs the recovery runs: `cfg.epochs`, raised to cover `cfg.min_steps` optimizer steps of
    `batch_size` on `train_images`; 0 (no recovery) when `cfg.epochs` is 0."""
    if not cfg.epochs:
        return 0
    return max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch(train_images, batch_size)))


def recovery_params(params: Params, train_images: int) -> Params:
    """`params` with the recovery fine-tune's train settings: `recovery_epochs` at `compress.lr`, every
    layer training, no warmup or early stop (it starts from trained weights), in one process."""
    c = params.compress
    train = params.train.model_copy(update={
        "epochs": recovery_epochs(c, train_images, params.train.batch_size), "lr": c.lr, "strategy": "full",
        "unfreeze_after": 0, "warmup_epochs": 0.0, "early_stop_patience": 0, "nproc": 1, "nnodes": 1})
    return params.model_copy(update={"train": train})


def recovery_key(params: Params, inputs: list[Path]) -> str:
    """The recovery checkpoint's key: what shapes the recovery, not the gate's settings, so that after
    a run the gate failed, a rerun with the gate changed resumes the finished recovery in seconds."""
    ungated = params.compress.model_copy(update={"max_acc_drop": 0.0, "gate": "optional"})
    return run_key(params.model_copy(update={"compress": ungated}), inputs, ("train", "log", "compress"))


def gate(acc_drop: float, cfg: CompressConfig) -> str | None:
    """None if a compressed model that lost `acc_drop` test accuracy keeps `cfg.max_acc_drop`; else the
    verdict, one line, or, with `cfg.gate` required, raise with it."""
    if acc_drop <= cfg.max_acc_drop:
        return None
    verdict = (f"the compressed model lost {acc_drop:.4f} test accuracy to pruning "
               f"(> compress.max_acc_drop {cfg.max_acc_drop})")
    if cfg.gate == "required":
        raise ReprotuneError(f"{verdict}; compress.gate is required, so nothing was written")
    return verdict


def _accuracy(model: Classifier, test: Split) -> float:
    return (batched_logits(model, test.images, THROUGHPUT_BATCH).argmax(1) == test.labels).float().mean().item()


def profile(model: Classifier, test: Split, onnx: Path) -> dict[str, float]:
    """What the model costs and how well it does, timing aside: test accuracy (PyTorch), parameters,
    forward FLOPs per image, and the size in MiB of its fp32 ONNX file, written to `onnx` for `speed`."""
    model = model.cpu().eval()
    images = to_float(test.images[:2])
    accuracy = _accuracy(model, test)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images[:1])
    export_onnx(model, images, onnx, opset=18)
    return {"test_acc": accuracy, "parameters": sum(p.numel() for p in model.parameters()),
            "flops": counter.get_total_flops(), "size_mb": onnx.stat().st_size / 2**20}


def speed(models: list[Path], test: Split) -> list[dict]:
    """ONNX Runtime batch-1 latency (ms) and batch-256 throughput (images/s) of each ONNX file on
    the CPU, medians over rounds that time every model in turn: a shared machine's drift then hits
    all of them alike, and their ratio holds where the absolute figures wander."""
    runs = [onnx_runner(path) for path in models]
    # Batch 1 on one thread, in a session of its own: at 32 px one image is too small to share between
    # threads, and on a busy machine a call waits for the other thread (hundreds of ms on 2 cores).
    single = [onnx_runner(path, threads=1) for path in models]
    batch = to_float(test.images[:THROUGHPUT_BATCH]).numpy()
    latency, batch_seconds = [[] for _ in runs], [[] for _ in runs]
    for run, one in zip(runs, single, strict=True):  # warm-up: the first calls allocate
        run(batch)
        for _ in range(LATENCY_WARMUP):
            one(batch[:1])
    for _ in range(THROUGHPUT_RUNS):
        for i, (run, one) in enumerate(zip(runs, single, strict=True)):
            started = time.perf_counter()
            run(batch)
            batch_seconds[i].append(time.perf_counter() - started)
            for _ in range(LATENCY_RUNS // THROUGHPUT_RUNS):
                started = time.perf_counter()
                one(batch[:1])
                latency[i].append(time.perf_counter() - started)
    return [{"latency_ms": 1000 * statistics.median(lat), "images_per_second": len(batch) / statistics.median(sec)}
            for lat, sec in zip(latency, batch_seconds, strict=True)]


def compress(params: Params, model: Classifier, train: Split, val: Split, test: Split,
             checkpoints: Checkpoints) -> tuple[Classifier, CompressMetrics, str | None]:
    """Prune `model`, fine-tune it back (resuming if interrupted), measure both, gate: the compressed
    model (CPU, eval mode), metrics/compress.json, and the gate's verdict when it missed
    `compress.max_acc_drop` (with `compress.gate` required, raise instead). The recovery's curves go to
    `checkpoints.logdir`."""
    cfg = params.compress
    with tempfile.TemporaryDirectory() as work:
        before = profile(model, test, Path(work) / "unpruned.onnx")
        pruned = prune(model, cfg, to_float(train.images[:2]), params.seed)
        pruned_acc = _accuracy(pruned, test)
        recovery: Recovery = {"epochs": 0}
        if cfg.epochs:
            result = finetune(recovery_params(params, len(train.labels)), train, val, checkpoints, start=pruned,
                              teacher=model if cfg.distill else None)
            pruned = result.model
            recovery = {k: result.metrics[k] for k in ("epochs", "best_epoch", "best_val_acc", "train_seconds")}
            recovery["steps"] = recovery["epochs"] * steps_per_epoch(len(train.labels), params.train.batch_size)
        after = profile(pruned, test, Path(work) / "compressed.onnx")
        acc_drop = before["test_acc"] - after["test_acc"]
        verdict = gate(acc_drop, cfg)  # raises when required and missed: before the timing and any output
        timed = speed([Path(work) / "unpruned.onnx", Path(work) / "compressed.onnx"], test)
        before, after = {**before, **timed[0]}, {**after, **timed[1]}
    # Headline first (`dvc exp show` keeps the leftmost columns): accuracy, the verdict, what it bought.
    metrics: CompressMetrics = {
        "test_acc": after["test_acc"], "acc_change": -acc_drop, "accepted": verdict is None,
        "flops_ratio": after["flops"] / before["flops"],
        "speedup": after["images_per_second"] / before["images_per_second"], "ratio": cfg.ratio,
        "pruned_test_acc": pruned_acc,  # straight after pruning, before recovery
        "before": before, "after": after, "recovery": recovery}
    return pruned, metrics, verdict


def log_compress(writer: SummaryWriter, metrics: CompressMetrics) -> None:
    """Before and after, side by side: scalars and a table."""
    for key in ("test_acc", "acc_change", "flops_ratio", "speedup", "pruned_test_acc"):
        writer.add_scalar(f"compress/{key}", metrics[key], 0)
    rows = [[key, f"{metrics['before'][key]:.4g}", f"{metrics['after'][key]:.4g}",
             f"{metrics['after'][key] / metrics['before'][key]:.3f}"] for key in PROFILE_KEYS]
    tensorboard.log_table(writer, "compress/summary", ["measure", "unpruned", "compressed", "ratio"], rows)

