"""The preprocess stage's work after reading: split, and log samples, class counts and normalization.
"""

from __future__ import annotations

import time

import numpy as np
from tensorboardX import SummaryWriter

from reprotune.config import DataConfig
from reprotune.data.cifar import CIFAR10, cifar100, read_archive
from reprotune.data.raw import RawData
from reprotune.data.splits import Split, make_splits
from reprotune.tracking import tensorboard


def read_cifar(cfg: DataConfig) -> RawData:
    """The CIFAR archive (or the synthetic one) the download stage wrote for `cfg`."""
    return read_archive(cfg.archive, cifar100(cfg.cifar100_labels) if cfg.dataset == "cifar100" else CIFAR10)


def preprocess(raw: RawData, cfg: DataConfig, seed: int, log_images: int, writer: SummaryWriter
               ) -> tuple[dict[str, Split], dict]:
    """The preprocess stage after reading (`read_cifar` or `folders.read`): split, and log samples
    and counts."""
    started = time.perf_counter()
    splits = make_splits(raw, cfg.val_fraction, seed)
    classes = splits["train"].classes
    counts = {name: np.bincount(s.labels.numpy(), minlength=len(classes)).tolist() for name, s in splits.items()}
    for name, split in splits.items():
        tensorboard.log_samples(writer, f"{name}/samples", split.images, split.labels, classes, log_images)
        writer.add_histogram(f"{name}/labels", split.labels.numpy(), 0, bins=np.arange(len(classes) + 1) - 0.5)
        writer.add_scalar(f"{name}/images", len(split.labels), 0)
    tensorboard.log_table(writer, "class_counts", ["class", *splits],
                 [[c, *(counts[s][i] for s in splits)] for i, c in enumerate(classes)])
    mean, std = splits["train"].mean, splits["train"].std
    tensorboard.log_table(writer, "normalization", ["", "R", "G", "B"],
                 [["mean", *(f"{m:.4f}" for m in mean)], ["std", *(f"{s:.4f}" for s in std)]])
    writer.add_scalar("skipped_images", len(raw.skipped), 0)
    metrics = {"classes": len(classes), "image_size": int(splits["train"].images.shape[-1]),
               "mean": mean, "std": std, "seconds": time.perf_counter() - started,
               **{f"{name}_images": len(s.labels) for name, s in splits.items()},
               "skipped_images": len(raw.skipped)}
    return splits, metrics

