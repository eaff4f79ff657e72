"""Your own images: the common folder layout, from a local tree or an archive (tar, tar.gz, zip) of one.

- Layout: `<root>/<class>/...` (every file under a class folder, at any depth), or the same under
  `<root>/train/` with a test set under `<root>/test/` (or `<root>/val/`). Without a test root,
  `data.test_fraction` of each class is held out, stratified, by a fixed seed (TEST_SEED). A root
  that holds just one folder with folders inside (how archives usually wrap their tree) is looked
  into. Files directly under a root (a README, a CSV) are not images of any class and are left alone.
- Classes are the folder names, sorted; their order is the label order that travels into
  `models/model.pt` and the model card. Imagenette's WordNet ids become its readable class names.
- Every file is decoded once by `images.load_image`, the decoder `reprotune predict` uses (EXIF
  orientation, JPEG draft mode, RGB, shorter side resized then centre-cropped, a pixel limit), on
  a thread per core: Pillow releases the GIL while it decodes and resizes.
- A file that cannot be read is skipped and reported (`data.on_bad_image: fail` stops at it
  instead). Links are never followed out of a tree, nor at all in an archive, and an archive with an
  absolute or `..` path is refused whole.
- The preprocess stage decodes into a scratch file on disk (`scratch`), so a dataset of any size
  needs only the disk it takes; read into memory (no `scratch`), memory is estimated first. Either
  way the room needed is checked before anything is decoded.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from reprotune.config import DataConfig
from reprotune.data.cache import CachedImages, available_memory, write_header
from reprotune.data.raw import RawData
from reprotune.data.splits import held_out
from reprotune.errors import ReprotuneError
from reprotune.images import load_image

TEST_SEED = 0  # the test hold-out's seed: fixed, so a `seed` sweep is compared on the same test images
TEST_ROOTS = ("test", "val")  # the first present is the test set
MAX_FILES = 5_000_000  # entries in an archive or files in a tree; ImageNet-1k has 1.3 million
MAX_FILE_BYTES = 256 * 2**20  # one image file; larger ones are skipped, not read
MEMORY_FACTOR = 3  # peak host memory / decoded bytes, read into memory: the decoded array, then the split copies
DISK_FACTOR = 2  # disk / decoded bytes, decoded to a scratch file: the scratch file, then the splits
IN_FLIGHT_PER_WORKER = 8  # archive members read ahead of the decoders, per thread
# Imagenette's classes are WordNet ids; these are their names (torchvision's Imagenette table).
IMAGENETTE_NAMES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck",
    "n03425413": "gas pump", "n03445777": "golf ball", "n03888257": "parachute",
}


@dataclass
class File:
    """One image file: its path inside the tree or archive."""

    parts: tuple[str, ...]  # relative to the source's top


class Source:
    """A tree of files, listed once: relative paths and sizes, plus what was refused while listing."""

    def __init__(self, label: str):
        self.label = label  # how messages name the source
        self.files: list[File] = []
        self.dirs: set[tuple[str, ...]] = set()  # every folder, as parts (the top is ())
        self.skipped: list[str] = []

    def add(self, parts: tuple[str, ...], is_file: bool) -> None:
        """Record a file (or a folder) and the folders above it."""
        if is_file:
            self.files.append(File(parts))
            parts = parts[:-1]
        self.dirs.update(parts[:i] for i in range(len(parts) + 1))

    def children(self, folder: tuple[str, ...]) -> list[str]:
        """The names of the folders directly in `folder`, sorted."""
        n = len(folder)
        return sorted({d[n] for d in self.dirs if len(d) > n and d[:n] == folder})

    def where(self, parts: tuple[str, ...] | list[str]) -> str:
        """How a message names a file or folder of this source."""
        raise NotImplementedError

    def decoded(self, files: list[File], size: int, workers: int) -> Iterator[tuple[int, np.ndarray | str]]:
        """(index in `files`, the file decoded to (3, size, size) uint8 or why it could not be), for
        each file in the order the source reads them, decoded on `workers` threads a bounded number
        of files ahead of the reader."""
        def decode(indexed: tuple[int, bytes | None]) -> tuple[int, np.ndarray | str]:
            i, payload = indexed
            try:
                return i, load_image(self.where(files[i].parts), size, payload)
            except ReprotuneError as exc:
                return i, str(exc)

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            yield from _bounded(pool, decode, self._payloads(files), workers * IN_FLIGHT_PER_WORKER)

    def _payloads(self, files: list[File]) -> Iterator[tuple[int, bytes | None]]:
        """(index in `files`, the file's bytes, or None where the decoder opens the file itself)."""
        raise NotImplementedError


def _hidden(parts) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


class Tree(Source):
    """A local directory. Links are followed only to files inside it, never to folders."""

    def __init__(self, root: Path):
        super().__init__(str(root))
        self.root = root
        inside = root.resolve()
        for directory, dirs, names in os.walk(root, followlinks=False):
            here = Path(directory)
            rel = here.relative_to(root).parts
            self.add(rel, is_file=False)
            dirs[:] = sorted(d for d in dirs if not _hidden([d]))
            for d in dirs:
                if (here / d).is_symlink():  # os.walk does not go in
                    self.skipped.append(f"{here / d}: a linked folder, not followed")
            for name in sorted(names):
                path = here / name
                if _hidden([name]):
                    continue
                if path.is_symlink() and not path.resolve().is_relative_to(inside):
                    self.skipped.append(f"{path}: a link out of the tree, not followed")
                    continue
                try:
                    path.stat()
                except OSError as exc:  # a dangling link
                    self.skipped.append(f"{path}: cannot read ({exc.strerror})")
                    continue
                self.add((*rel, name), is_file=True)
                if len(self.files) > MAX_FILES:
                    raise ReprotuneError(f"{root}: more than {MAX_FILES:,} files")

    def where(self, parts) -> str:
        return str(self.root.joinpath(*parts))

    def _payloads(self, files):
        return ((i, None) for i in range(len(files)))


class Archive(Source):
    """A tar (optionally gzip, bzip2 or xz compressed) or zip file, read in memory, never extracted."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path
        if not path.is_file():
            raise ReprotuneError(f"{path}: archive not found (run the download stage first)")
        self.zip = zipfile.is_zipfile(path)
        seen: set[tuple[str, ...]] = set()
        try:
            for name, size, regular in self._entries():
                parts = PurePosixPath(name.removeprefix("./")).parts
                if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
                    raise ReprotuneError(f"{path}: member {name!r} would land outside the archive's "
                                         "folder; refusing the archive")
                if not parts or _hidden(parts):
                    continue
                if regular is None:  # a folder
                    self.add(parts, is_file=False)
                elif not regular:
                    self.skipped.append(f"{self.where(parts)}: a link or special file, not followed")
                elif size > MAX_FILE_BYTES:
                    self.skipped.append(f"{self.where(parts)}: {size:,} bytes, more than an image file can be")
                elif parts in seen:
                    self.skipped.append(f"{self.where(parts)}: a second entry of that name, not read")
                else:
                    seen.add(parts)
                    self.add(parts, is_file=True)
                if len(self.files) + len(self.skipped) > MAX_FILES:
                    raise ReprotuneError(f"{path}: more than {MAX_FILES:,} entries")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise ReprotuneError(f"{path}: not a readable tar or zip archive ({exc})") from None

    def _entries(self) -> Iterator[tuple[str, int, bool | None]]:
        """(name, size, regular file? None for a directory) for each entry, headers only."""
        if self.zip:
            with zipfile.ZipFile(self.path) as z:
                for info in z.infolist():
                    link = (info.external_attr >> 16) & 0o170000 == 0o120000
                    yield info.filename, info.file_size, None if info.is_dir() else not link
        else:
            with tarfile.open(self.path) as tar:
                for member in tar:
                    yield member.name, member.size, None if member.isdir() else member.isfile()

    def where(self, parts) -> str:
        return f"{self.path}:{'/'.join(parts)}"

    def _payloads(self, files):
        # Members are read in archive order (a compressed tar reads forwards only), on this thread.
        wanted = {"/".join(f.parts): i for i, f in enumerate(files)}
        try:
            if self.zip:
                with zipfile.ZipFile(self.path) as z:
                    for name, i in wanted.items():
                        yield i, z.read(name)
            else:
                with tarfile.open(self.path) as tar:
                    for member in tar:
                        i = wanted.pop("/".join(PurePosixPath(member.name.removeprefix("./")).parts), None)
                        if i is not None and member.isfile():  # its first entry only, as listed
                            yield i, tar.extractfile(member).read()
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise ReprotuneError(f"{self.path}: not a readable tar or zip archive ({exc})") from None


def _bounded(pool: concurrent.futures.Executor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """pool.map, in order, drawing from `items` only while fewer than `ahead` results wait."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# --------------------------------------------------------------------------- the layout


Folder = tuple[str, ...]  # a folder of a source, as path parts
Classes = dict[str, list[File]]  # class name -> its files


def layout(source: Source) -> tuple[Folder, Classes, Folder | None, Classes | None]:
    """(the train root, its classes, the test root and its classes, or None and None), checked."""
    root: tuple[str, ...] = ()
    while True:
        top = source.children(root)
        if len(top) == 1 and top[0] not in ("train", *TEST_ROOTS) and source.children((*root, top[0])):
            root = (*root, top[0])  # one folder holding folders: the archive's wrapper
            continue
        break
    if "train" not in top:
        return root, _classes(source, root), None, None
    train_root = (*root, "train")
    train = _classes(source, train_root)
    test_name = next((name for name in TEST_ROOTS if name in top), None)
    if test_name is None:
        return train_root, train, None, None
    test_root = (*root, test_name)
    test = _classes(source, test_root, single_ok=True)
    if set(test) != set(train):
        missing, extra = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise ReprotuneError(f"{source.where(test_root)}: its class folders differ from train/'s"
                             + (f": missing {', '.join(missing)}" if missing else "")
                             + (f"{';' if missing else ':'} not in train/: {', '.join(extra)}" if extra else ""))
    return train_root, train, test_root, test


def _classes(source: Source, root: tuple[str, ...], single_ok: bool = False) -> dict[str, list[File]]:
    """Class name -> its files (at any depth under its folder), every class folder checked."""
    names = source.children(root)
    label = source.where(root) if root else source.label
    if not names:
        raise ReprotuneError(f"{label}: no class folders (expected <root>/<class>/<image files>, "
                             "optionally under train/ and test/)")
    if len(names) == 1 and not single_ok:
        raise ReprotuneError(f"{label}: a single class folder ({names[0]}); a classifier needs two or more")
    n = len(root)
    classes: dict[str, list[File]] = {name: [] for name in names}
    for f in source.files:
        if len(f.parts) > n + 1 and f.parts[:n] == root:
            classes[f.parts[n]].append(f)
    for name, files in classes.items():
        if not files:
            raise ReprotuneError(f"{source.where((*root, name))}: a class folder with no files")
    return classes


# --------------------------------------------------------------------------- reading


def check_memory(images: int, size: int, where: str) -> None:
    """Refuse, before decoding, a dataset whose uint8 images cannot fit in host memory."""
    need = MEMORY_FACTOR * images * 3 * size * size
    have = available_memory()
    if need > have:
        fits = int(size * (have / need) ** 0.5)
        raise ReprotuneError(f"{where}: {images:,} images at data.image_size={size} need about "
                             f"{need / 2**30:.1f} GiB of memory, {have / 2**30:.1f} GiB is available: "
                             f"data.image_size={fits} or less would fit")


def one_heap() -> None:
    """Have glibc's malloc keep one heap for the whole process (M_ARENA_MAX 1), if it is glibc's.
    Each decoder thread otherwise gets a heap of its own, which Pillow's buffers fragment: a
    preprocess's peak memory grew about 100 MiB from 6,000 to 24,000 images at 224 px (1,001 ->
    1,103 MiB), and stayed at 1,000 with one heap, no slower. Call before the threads start."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX (malloc.h)


def check_disk(images: int, size: int, folder: Path, where: str) -> None:
    """Refuse, before decoding, a dataset whose decoded images and their splits do not fit on the disk."""
    need = DISK_FACTOR * images * 3 * size * size
    have = shutil.disk_usage(folder).free
    if need > have:
        raise ReprotuneError(f"{where}: {images:,} images at data.image_size={size} need about "
                             f"{need / 2**30:.1f} GiB of disk in {folder} while preprocessing, "
                             f"{have / 2**30:.1f} GiB is free")


def source_of(cfg: DataConfig) -> Source:
    """The tree or archive `cfg` names."""
    if cfg.archive is not None:
        return Archive(cfg.archive)
    root = Path(cfg.path)
    if root.is_file():
        return Archive(root)
    if not root.is_dir():
        raise ReprotuneError(f"{root}: data.path is not a folder (nor an archive) of images")
    return Tree(root)


def read(cfg: DataConfig, workers: int | None = None, scratch: Path | None = None) -> RawData:
    """Decode every image of the folder dataset `cfg` names, once: train and test, classes sorted.
    With `scratch` (a file to create), the decoded images go there and stay on disk."""
    return read_source(source_of(cfg), cfg, workers, scratch)


class _Scratch:
    """Decoded images written to a `.npy` file by position, as they come (never held in memory)."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path, self.row_bytes = path, int(np.prod(shape[1:]))
        with open(path, "wb") as f:
            write_header(f, shape)
            self.offset = f.tell()
            f.truncate(self.offset + shape[0] * self.row_bytes)  # sparse until written
        self.fd = os.open(path, os.O_WRONLY)

    def __setitem__(self, i: int, image: np.ndarray) -> None:
        os.pwrite(self.fd, memoryview(np.ascontiguousarray(image)).cast("B"), self.offset + i * self.row_bytes)

    def close(self) -> CachedImages:
        os.close(self.fd)
        return CachedImages.open(self.path)


def read_source(source: Source, cfg: DataConfig, workers: int | None = None, scratch: Path | None = None
                ) -> RawData:
    """Decode every image of a listed tree or archive, once, per `cfg`: into memory, or into the
    file `scratch` (then the returned images are selections of it, on disk)."""
    train_root, train, test_root, test = layout(source)
    names = sorted(train)
    items = [(f, label, False) for label, name in enumerate(names) for f in train[name]]
    if test is not None:
        items += [(f, label, True) for label, name in enumerate(names) for f in test[name]]
    shape = (len(items), 3, cfg.image_size, cfg.image_size)
    if scratch is None:
        check_memory(len(items), cfg.image_size, source.label)
        images = np.empty(shape, dtype=np.uint8)
    else:
        check_disk(len(items), cfg.image_size, scratch.parent, source.label)
        images = _Scratch(scratch, shape)
    labels = np.array([label for _, label, _ in items], dtype=np.int64)
    is_test = np.array([test for _, _, test in items], dtype=bool)
    readable = np.zeros(len(items), dtype=bool)
    failed = []
    with tqdm(total=len(items), unit="img", desc="decoding", leave=False, disable=None) as bar:
        for i, result in source.decoded([f for f, _, _ in items], cfg.image_size, workers or os.cpu_count() or 1):
            bar.update()
            if isinstance(result, str):
                if cfg.on_bad_image == "fail":
                    raise ReprotuneError(f"{result} (data.on_bad_image: fail; skip would leave it out)")
                failed.append((i, result))
                continue
            images[i], readable[i] = result, True
    skipped = source.skipped + [reason for _, reason in sorted(failed)]
    classes = [IMAGENETTE_NAMES.get(n, n) for n in names] if cfg.dataset == "imagenette" else names
    folder = {label: source.where((*train_root, name)) for label, name in enumerate(names)}
    if test is None:
        is_test[readable] = _hold_out(labels[readable], cfg.test_fraction, folder, "data.test_fraction")
    else:
        test_folder = {c: source.where((*test_root, n)) for c, n in enumerate(names)}
        _require(labels[readable & is_test], len(names), test_folder, "the test set")
    train_part, test_part = readable & ~is_test, readable & is_test
    _require_two(labels[train_part], folder, "data.val_fraction")
    if isinstance(images, _Scratch):
        decoded = images.close()
        return RawData(decoded.select(np.flatnonzero(train_part)), labels[train_part],
                       decoded.select(np.flatnonzero(test_part)), labels[test_part], classes, skipped)
    return RawData(images[train_part], labels[train_part], images[test_part], labels[test_part], classes, skipped)


def _require(labels: np.ndarray, classes: int, folder: dict[int, str], what: str) -> None:
    counts = np.bincount(labels, minlength=classes)
    for c in np.flatnonzero(counts == 0):
        raise ReprotuneError(f"{folder[c]}: no readable images for {what}")


def _require_two(labels: np.ndarray, folder: dict[int, str], key: str) -> None:
    """Every class has the two images a split needs: one on each side."""
    for c, n in enumerate(np.bincount(labels, minlength=len(folder))):
        if n < 2:
            raise ReprotuneError(f"{folder[c]}: {n} readable image(s), too few for {key} (each class needs at "
                                 "least one image on each side of the split)")


def _hold_out(labels: np.ndarray, fraction: float, folder: dict[int, str], key: str) -> np.ndarray:
    """Mark `fraction` of each class (data.held_out's count, seeded by TEST_SEED)."""
    _require_two(labels, folder, key)
    rng = np.random.default_rng(TEST_SEED)
    marked = np.zeros(len(labels), dtype=bool)
    for c in range(len(folder)):
        members = rng.permutation(np.flatnonzero(labels == c))
        marked[members[:held_out(len(members), fraction)]] = True
    return marked
