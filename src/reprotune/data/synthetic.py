"""The offline synthetic dataset: coloured stripes in CIFAR-10's archive layout, so the whole DAG runs
without a network through the code path real data takes.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np

from reprotune.data.cifar import ARCHIVE_DIR, ROW, SIDE, TRAIN_BATCHES
from reprotune.data.raw import RawData
from reprotune.files import atomic_file, file_md5

# Ten classes = 5 colours x 2 stripe orientations: colour alone or orientation alone gets at most 50%,
# so a model must learn both, and noise, phase and brightness vary within each class.
_COLOURS = {"red": (0.85, 0.25, 0.2), "green": (0.25, 0.75, 0.3), "blue": (0.2, 0.35, 0.85),
            "yellow": (0.85, 0.8, 0.25), "purple": (0.6, 0.3, 0.7)}
SYNTHETIC_CLASSES = [f"{colour}-{way}" for way in ("horizontal", "vertical") for colour in _COLOURS]


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images (N, 3072) uint8 for class `labels`: jittered class colour + faint stripes + noise."""
    n = len(labels)
    colour = np.array(list(_COLOURS.values()), dtype=np.float32)[labels % 5]  # (N, 3)
    colour += rng.normal(0, 0.16, size=colour.shape).astype(np.float32)  # neighbouring colours overlap
    vertical = (labels >= 5)[:, None, None]
    ramp = np.arange(SIDE, dtype=np.float32)
    period = rng.uniform(4.0, 10.0, size=(n, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
    contrast = rng.uniform(0.02, 0.15, size=(n, 1, 1, 1)).astype(np.float32)
    coord = np.where(vertical, ramp[None, None, :], ramp[None, :, None])  # (N, 32, 32)
    stripes = np.sin(2 * np.pi * coord / period + phase)  # (N, 32, 32) in [-1, 1]
    brightness = rng.uniform(0.7, 1.1, size=(n, 1, 1, 1)).astype(np.float32)
    image = brightness * colour[:, :, None, None] * 0.8 + contrast * stripes[:, None]
    image += rng.normal(0, 0.25, size=image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(n, ROW)


def synthetic_raw(n_train: int, n_test: int, seed: int = 0) -> RawData:
    """The synthetic classes in memory, as a reader returns them: `n_train` training and `n_test` test
    images, each set's classes in equal shares and shuffled, drawn from one generator seeded with
    `seed`. The tests and benchmarks build their data here (the pipeline writes an archive instead:
    this module stays torch-free for the download stage); `make_splits` splits it."""
    rng = np.random.default_rng(seed)
    labels, test_labels = rng.permutation(np.arange(n_train) % 10), rng.permutation(np.arange(n_test) % 10)
    return RawData(synthetic_images(labels, rng).reshape(-1, 3, SIDE, SIDE), labels,
                   synthetic_images(test_labels, rng).reshape(-1, 3, SIDE, SIDE), test_labels, SYNTHETIC_CLASSES)


def write_synthetic_archive(dest: Path, n_train: int, n_test: int, seed: int) -> dict:
    """Generate a deterministic, learnable 10-class dataset as a CIFAR-10 python archive."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    members = {}
    train_labels = np.arange(n_train) % 10
    rng.shuffle(train_labels)
    for i, part in enumerate(np.array_split(np.arange(n_train), len(TRAIN_BATCHES))):
        members[TRAIN_BATCHES[i]] = _batch(f"training batch {i + 1} of 5", train_labels[part], rng)
    test_labels = rng.permutation(np.arange(n_test) % 10)
    members["test_batch"] = _batch("testing batch 1 of 1", test_labels, rng)
    members["batches.meta"] = {"label_names": SYNTHETIC_CLASSES,
                               "num_cases_per_batch": len(members[TRAIN_BATCHES[0]]["labels"]),
                               "num_vis": ROW}
    with atomic_file(dest) as tmp:
        _write_tar_gz(tmp, {f"{ARCHIVE_DIR}/{k}": pickle.dumps(v, protocol=4) for k, v in members.items()})
        digest = file_md5(tmp)
        size = tmp.stat().st_size
    return {"url": "synthetic", "md5": digest, "bytes": size, "seconds": time.perf_counter() - started}


def _batch(name: str, labels: np.ndarray, rng: np.random.Generator) -> dict:
    return {"batch_label": name, "labels": labels.tolist(), "data": synthetic_images(labels, rng),
            "filenames": [f"synthetic_{i:06d}.png" for i in range(len(labels))]}


def _write_tar_gz(path: Path, files: dict[str, bytes]) -> None:
    # mtime 0 in both the gzip header and the tar entries: same seed, same bytes, same md5.
    with path.open("wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0,
                                               compresslevel=1) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            tar.addfile(info, io.BytesIO(payload))

