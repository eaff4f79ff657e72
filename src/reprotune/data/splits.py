"""Splits: the cached uint8 images with labels and class names, stratified train/val, normalization
statistics, and the uint8 -> float conversion every model input goes through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reprotune.data.raw import RawData
from reprotune.errors import ReprotuneError
from reprotune.tensorfiles import load_torch


@dataclass
class Split:
    """One cached split: uint8 images (N, 3, S, S), int64 labels, class names, train mean/std."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]

    def to_dict(self) -> dict:
        return {"images": self.images, "labels": self.labels, "classes": self.classes,
                "mean": self.mean, "std": self.std}


def held_out(n: int, fraction: float) -> int:
    """How many of a class's `n` images a split of `fraction` takes: rounded, but at least one and
    never all, so a small class is on both sides (a class of one image stays on the first side)."""
    return min(n - 1, max(1, int(round(fraction * n)))) if n > 1 else 0


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): `val_fraction` of each class to val, seeded, each side sorted."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        val.append(members[:held_out(len(members), val_fraction)])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(labels)), val)
    if len(val) == 0 or len(train) == 0:
        raise ReprotuneError(f"data.val_fraction={val_fraction} leaves an empty split "
                             f"of {len(labels)} training images")
    return train, val


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, 3, H, W), on the [0, 1] scale.

    Exact, from each channel's 256-bin histogram: no float copy of the data (a float32 copy of
    CIFAR-10's training set alone is 550 MB; this peaks at one 46 MB channel).
    """
    values = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].ravel(), minlength=256)
        n = counts.sum()
        m = (counts @ values) / n
        mean.append(m / 255)
        std.append(float(np.sqrt(max(0.0, (counts @ values**2) / n - m * m))) / 255)
    return [float(m) for m in mean], std


def make_splits(raw: RawData, val_fraction: float, seed: int) -> dict[str, Split]:
    """Split the training batches into train/val and package all three splits."""
    train_idx, val_idx = stratified_split(raw.train_labels, val_fraction, seed)
    mean, std = channel_stats(raw.train_images[train_idx])

    def split(images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels),
                     raw.classes, mean, std)

    return {"train": split(raw.train_images[train_idx], raw.train_labels[train_idx]),
            "val": split(raw.train_images[val_idx], raw.train_labels[val_idx]),
            "test": split(raw.test_images, raw.test_labels)}


def load_split(path: Path) -> Split:
    """Load a cached split written by the preprocess stage."""
    obj = load_torch(path, "processed split")
    try:
        split = Split(obj["images"], obj["labels"], list(obj["classes"]), list(obj["mean"]), list(obj["std"]))
    except (KeyError, TypeError):
        raise ReprotuneError(f"{path}: not a processed split (rerun the preprocess stage)") from None
    if split.images.dtype != torch.uint8 or split.images.ndim != 4 or len(split.labels) != len(split.images):
        raise ReprotuneError(f"{path}: not a processed split (rerun the preprocess stage)")
    return split


# ITU-R 601 luma, the weights of torchvision's rgb_to_grayscale (colour jitter, drift statistics)
GREY = (0.2989, 0.587, 0.114)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1], the models' input contract."""
    return images.float().div_(255)

