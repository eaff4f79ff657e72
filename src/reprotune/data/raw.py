"""What a dataset reader returns (the CIFAR archive reader and the folder reader alike), before splitting."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RawData:
    """A dataset's images: uint8 (N, 3, S, S) in memory, or on disk (`cache.CachedImages`: a folder
    dataset decoded by the preprocess stage), int64 labels (N,), class names; `skipped` lists the
    files that could not be read (folder datasets), as `path: reason`."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    skipped: list[str] = field(default_factory=list)
