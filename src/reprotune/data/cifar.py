"""CIFAR archives, read without trusting them.

CIFAR-10's official layout (`cifar-10-batches-py/data_batch_1..5`, `test_batch`, `batches.meta`) and
CIFAR-100's (`cifar-100-python/train`, `test`, `meta`), each member a pickle of a dict holding a uint8
(N, 3072) array in R,G,B plane order. Only numpy's array reconstruction may be unpickled. The synthetic
dataset is written in CIFAR-10's layout (`synthetic.py`), so it goes through exactly the code real data
takes; folder trees of image files, and archives of them, are read by `folders.py`.
"""

from __future__ import annotations

import gzip
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reprotune.config import CIFAR_SIDE
from reprotune.data.raw import RawData
from reprotune.errors import ReprotuneError

SIDE = CIFAR_SIDE  # CIFAR images are 3x32x32
ROW = 3 * SIDE * SIDE  # one image as stored in a batch: 3072 bytes, R plane then G then B
MAX_MEMBER_BYTES = 512 * 2**20  # CIFAR-100's train member pickles to ~155 MB; refuse absurd members
MAX_MEMBERS = 64  # the official archives have 5 to 8 entries


@dataclass(frozen=True)
class Layout:
    """Where a CIFAR archive keeps its batches, class names and labels."""

    title: str
    directory: str
    train: tuple[str, ...]
    test: str
    meta: str
    names_key: str  # in the meta member
    labels_key: str  # in each batch


CIFAR10 = Layout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                 "batches.meta", "label_names", "labels")


def cifar100(labels: str = "fine") -> Layout:
    """CIFAR-100's layout, with its fine (100) or coarse (20) labels."""
    return Layout("CIFAR-100", "cifar-100-python", ("train",), "test", "meta", f"{labels}_label_names",
                  f"{labels}_labels")


ARCHIVE_DIR = CIFAR10.directory
TRAIN_BATCHES = list(CIFAR10.train)


# The only globals a CIFAR batch needs: numpy's array reconstruction. Anything else (os.system,
# builtins.eval, ...) is refused, so a hostile pickle cannot run code. Taken from numpy itself so
# numpy 1 and 2 module names both resolve.
_NUMPY_GLOBALS = {
    "_reconstruct": np.ndarray.__reduce__(np.zeros(1))[0],
    "scalar": np.float64(0).__reduce__()[0],
    "ndarray": np.ndarray,
    "dtype": np.dtype,
}


_NUMPY_MODULES = {"numpy", "numpy.core.multiarray", "numpy._core.multiarray"}


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """How Python 3 pickles bytes at protocol 2 (`_codecs.encode(text, 'latin1')`), and nothing more."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with {encoding!r}")
    return text.encode("latin1")


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _NUMPY_MODULES and name in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[name]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_archive(path: Path, layout: Layout = CIFAR10) -> RawData:
    """Read a CIFAR python archive in memory, validating every batch; never extracts to disk."""
    if not path.is_file():
        raise ReprotuneError(f"{path}: archive not found (run the download stage first)")
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {}
            for member in tar:  # headers only; a CIFAR archive has 5 to 8 entries
                if len(members) == MAX_MEMBERS:
                    raise ReprotuneError(f"{path}: more than {MAX_MEMBERS} entries, not a {layout.title} archive")
                members[member.name.removeprefix("./")] = member
            meta = _load_member(tar, members, path, layout, layout.meta)
            classes = _class_names(meta, path, layout)
            train = [_load_batch(tar, members, path, layout, name, len(classes)) for name in layout.train]
            test = _load_batch(tar, members, path, layout, layout.test, len(classes))
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
        raise ReprotuneError(f"{path}: not a readable {layout.title} tar.gz archive ({exc})") from None
    return RawData(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   test[0], test[1], classes)


def _load_member(tar: tarfile.TarFile, members: dict, path: Path, layout: Layout, name: str) -> dict:
    member = members.get(f"{layout.directory}/{name}")
    if member is None:
        raise ReprotuneError(f"{path}: {layout.directory}/{name} is missing from the archive")
    if not member.isfile():  # a link could point anywhere: never followed
        raise ReprotuneError(f"{path}: {layout.directory}/{name} is a link or special file, not a regular file")
    if member.size > MAX_MEMBER_BYTES:
        raise ReprotuneError(f"{path}: {name} is {member.size} bytes, more than a CIFAR batch can be")
    try:
        obj = _SafeUnpickler(tar.extractfile(member), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ReprotuneError(f"{path}: {name} is not a CIFAR batch ({exc})") from None
    if not isinstance(obj, dict):
        raise ReprotuneError(f"{path}: {name} is not a CIFAR batch (a {type(obj).__name__})")
    # Python 2 pickles read with latin1 give str keys; some re-packs carry bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _class_names(meta: dict, path: Path, layout: Layout) -> list[str]:
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or len(names) < 2:
        raise ReprotuneError(f"{path}: {layout.meta} has no list of {layout.names_key}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _load_batch(tar, members, path: Path, layout: Layout, name: str, num_classes: int
                ) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_member(tar, members, path, layout, name)
    data, labels = batch.get("data"), batch.get(layout.labels_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ReprotuneError(f"{path}: {name}: 'data' must be a uint8 (N, {ROW}) array, got {got}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise ReprotuneError(f"{path}: {name}: '{layout.labels_key}' is not a list of integers") from None
    if labels.shape != (len(data),):
        raise ReprotuneError(f"{path}: {name}: {labels.size} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ReprotuneError(f"{path}: {name}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, SIDE, SIDE), labels

