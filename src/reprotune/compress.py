"""Structured pruning: remove whole channels, then win back the accuracy with a short fine-tune.

Torch-Pruning traces the model's dependency graph, so removing an output channel of one conv also
removes the matching input channel of every layer that reads it, across residual additions and
BatchNorm. The result is an ordinary, narrower ResNet18: dense kernels run it faster on any
hardware, unlike unstructured (zeroed-weight) sparsity. Recovery goes through finetune's loop,
checkpoints and logs (`train.finetune` with a `start` model), optionally distilling from the
unpruned model. Before and after are measured the way they are served: ONNX Runtime on the CPU.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch_pruning as tp
from tensorboardX import SummaryWriter
from torch.utils.flop_counter import FlopCounterMode

from reprotune import tb
from reprotune.checkpoint import Checkpoints
from reprotune.config import CompressConfig, Params
from reprotune.data import Split, to_float
from reprotune.evaluate import predict
from reprotune.export import export_onnx, median_latency_ms
from reprotune.model import Classifier
from reprotune.runtime import onnx_runner
from reprotune.train import finetune

ROUND_TO = 8  # channels kept per layer, a multiple of this: vectorized kernels run 8-wide
MAX_LAYER_RATIO = 0.9  # global pruning may empty a layer of low-magnitude channels; keep 10% of each
LATENCY_RUNS = 50  # batch-1 ONNX Runtime calls timed (median reported)
THROUGHPUT_BATCH, THROUGHPUT_RUNS = 256, 5  # batch-256 calls timed (median reported)
PROFILE_KEYS = ("test_acc", "parameters", "flops", "size_mb", "latency_ms", "images_per_second")

IMPORTANCE = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
    "fpgm": lambda: tp.importance.FPGMImportance(p=2),
    "random": lambda: tp.importance.RandomImportance(),
}


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


def recovery_params(params: Params) -> Params:
    """`params` with the recovery fine-tune's train settings: `compress.epochs` at `compress.lr`, every
    layer training, no warmup or early stop (it starts from trained weights), in one process."""
    c = params.compress
    train = params.train.model_copy(update={
        "epochs": c.epochs, "lr": c.lr, "strategy": "full", "unfreeze_after": 0, "warmup_epochs": 0.0,
        "early_stop_patience": 0, "nproc": 1, "nnodes": 1})
    return params.model_copy(update={"train": train})


def profile(model: Classifier, test: Split, workdir: Path) -> dict:
    """What the model costs and how well it does: test accuracy (PyTorch), parameters, forward
    FLOPs per image, the fp32 ONNX file's size in MiB, ONNX Runtime batch-1 latency and batch-256
    throughput (CPU)."""
    model = model.cpu().eval()
    images = to_float(test.images[:THROUGHPUT_BATCH])
    accuracy = (predict(model, test.images, THROUGHPUT_BATCH).argmax(1) == test.labels).float().mean().item()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images[:1])
    path = Path(workdir) / f"profile-{id(model)}.onnx"
    export_onnx(model, images[:2], path, opset=18)
    run = onnx_runner(path)
    batch = images.numpy()
    run(batch)  # warm-up: the first call allocates
    seconds = []
    for _ in range(THROUGHPUT_RUNS):
        started = time.perf_counter()
        run(batch)
        seconds.append(time.perf_counter() - started)
    return {"test_acc": accuracy, "parameters": sum(p.numel() for p in model.parameters()),
            "flops": counter.get_total_flops(), "size_mb": path.stat().st_size / 2**20,
            "latency_ms": median_latency_ms(run, batch[:1], LATENCY_RUNS),
            "images_per_second": len(batch) / statistics.median(seconds)}


def compress(params: Params, model: Classifier, train: Split, val: Split, test: Split,
             checkpoints: Checkpoints) -> tuple[Classifier, dict]:
    """Prune `model`, fine-tune it back (resuming if interrupted), measure both: the compressed model
    (CPU, eval mode) and metrics/compress.json. The recovery's curves go to `checkpoints.logdir`."""
    cfg = params.compress
    with tempfile.TemporaryDirectory() as work:
        before = profile(model, test, Path(work))
        pruned = prune(model, cfg, to_float(train.images[:2]), params.seed)
        pruned_acc = (predict(pruned, test.images, THROUGHPUT_BATCH).argmax(1) == test.labels).float().mean().item()
        recovery = {"epochs": 0}
        if cfg.epochs:
            result = finetune(recovery_params(params), train, val, checkpoints, start=pruned,
                              teacher=model if cfg.distill else None)
            pruned = result.model
            recovery = {k: result.metrics[k] for k in ("epochs", "best_epoch", "best_val_acc", "train_seconds")}
        after = profile(pruned, test, Path(work))
    # Headline first (`dvc exp show` keeps the leftmost columns): accuracy and what it bought.
    metrics = {"test_acc": after["test_acc"], "acc_change": after["test_acc"] - before["test_acc"],
               "flops_ratio": after["flops"] / before["flops"],
               "speedup": after["images_per_second"] / before["images_per_second"], "ratio": cfg.ratio,
               "pruned_test_acc": pruned_acc,  # straight after pruning, before recovery
               "before": before, "after": after, "recovery": recovery}
    return pruned, metrics


def log_compress(writer: SummaryWriter, metrics: dict) -> None:
    """Before and after, side by side: scalars and a table."""
    for key in ("test_acc", "acc_change", "flops_ratio", "speedup", "pruned_test_acc"):
        writer.add_scalar(f"compress/{key}", metrics[key], 0)
    rows = [[key, f"{metrics['before'][key]:.4g}", f"{metrics['after'][key]:.4g}",
             f"{metrics['after'][key] / metrics['before'][key]:.3f}"] for key in PROFILE_KEYS]
    tb.log_table(writer, "compress/summary", ["measure", "unpruned", "compressed", "ratio"], rows)

