"""Splits: the cached uint8 images with labels and class names, stratified train/val, normalization
statistics, and the uint8 -> float conversion every model input goes through. On disk a split is
`data/cache.py`'s pair of files; loaded, its images stay there (`CachedImages`) until read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reprotune.data.cache import CACHE_FORMAT, RERUN, CachedImages, images_path, in_chunks, write_images
from reprotune.data.raw import RawData
from reprotune.errors import ReprotuneError
from reprotune.tensorfiles import load_torch, save_torch


@dataclass
class Split:
    """One split: uint8 images (N, 3, S, S) in memory or in the cache on disk, int64 labels, class
    names, the training set's mean/std."""

    images: torch.Tensor | CachedImages
    labels: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]


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


def channel_stats(images) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, 3, H, W), on the [0, 1] scale.

    Exact, from each channel's 256-bin histogram, counted a bounded chunk at a time: no float copy
    of the data (a float32 copy of CIFAR-10's training set alone is 550 MB), and images on disk are
    read once, never whole.
    """
    histogram = np.zeros((images.shape[1], 256), dtype=np.int64)
    for block in in_chunks(images):
        for c in range(images.shape[1]):
            histogram[c] += np.bincount(block[:, c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for counts in histogram:
        n = counts.sum()
        m = (counts @ values) / n
        mean.append(m / 255)
        std.append(float(np.sqrt(max(0.0, (counts @ values**2) / n - m * m))) / 255)
    return [float(m) for m in mean], std


def make_splits(raw: RawData, val_fraction: float, seed: int) -> dict[str, Split]:
    """Split the training batches into train/val and package all three splits. Images in memory are
    copied into each split; images on disk (`CachedImages`) are only selected, read when written."""
    train_idx, val_idx = stratified_split(raw.train_labels, val_fraction, seed)

    def take(images, rows: np.ndarray):
        if isinstance(images, CachedImages):
            return images.select(rows)
        return torch.from_numpy(np.ascontiguousarray(images[rows]))

    train = take(raw.train_images, train_idx)
    mean, std = channel_stats(train)

    def split(images, labels: np.ndarray) -> Split:
        if not isinstance(images, CachedImages | torch.Tensor):
            images = torch.from_numpy(np.ascontiguousarray(images))
        return Split(images, torch.from_numpy(labels), raw.classes, mean, std)

    return {"train": split(train, raw.train_labels[train_idx]),
            "val": split(take(raw.train_images, val_idx), raw.train_labels[val_idx]),
            "test": split(raw.test_images, raw.test_labels)}


def save_split(split: Split, path: Path) -> None:
    """Write `split` as the cache's pair of files: `path` (labels, classes, mean/std) and its images
    beside it, streamed a chunk at a time (callers make the pair atomic: the stage writes a directory)."""
    write_images(images_path(path), split.images)
    save_torch(path, {"format": CACHE_FORMAT, "images": images_path(path).name, "labels": split.labels,
                      "classes": split.classes, "mean": split.mean, "std": split.std})


def load_split(path: Path) -> Split:
    """A split the preprocess stage cached, its images left on disk (read by range or index)."""
    obj = load_torch(path, "processed split")
    if isinstance(obj, dict) and isinstance(obj.get("images"), torch.Tensor):
        raise ReprotuneError(f"{path}: a processed split from an older reprotune (its images inside the .pt): {RERUN}")
    try:
        if obj["format"] != CACHE_FORMAT:
            raise ReprotuneError(f"{path}: processed split format {obj['format']}, this reprotune reads "
                                 f"{CACHE_FORMAT}: {RERUN}")
        images = CachedImages.open(path.parent / obj["images"])
        split = Split(images, obj["labels"], list(obj["classes"]), list(obj["mean"]), list(obj["std"]))
    except (KeyError, TypeError):
        raise ReprotuneError(f"{path}: not a processed split: {RERUN}") from None
    if split.labels.ndim != 1 or len(split.labels) != len(split.images):
        raise ReprotuneError(f"{path}: {len(split.labels)} labels for {len(split.images)} images: {RERUN}")
    return split


# ITU-R 601 luma, the weights of torchvision's rgb_to_grayscale (colour jitter, drift statistics)
GREY = (0.2989, 0.587, 0.114)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1], the models' input contract."""
    return images.float().div_(255)

