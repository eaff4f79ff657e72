"""The processed cache on disk: each split's uint8 images (N, 3, S, S) as a memory-mappable `.npy`
array (`train.images.npy`), with its labels, class names and the training set's mean/std beside it in
a small `.pt` (`train.pt`). Written streaming, a bounded number of images at a time; read by index or
by range without loading the file whole.

Reads go through `os.preadv` into the caller's buffer, not through a memory map: pages read that way
sit in the kernel's page cache, shared and reclaimable, never in the process's RSS or address space.
(Pages touched through a map stay in the process's RSS, and a map of a 100 GB file needs 100 GB of
address space, which `ulimit -v` or a container may not give.) The file is a plain `.npy`, so
`numpy.load(path, mmap_mode="r")` maps it for anyone who wants to look inside.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from reprotune.errors import ReprotuneError

CACHE_FORMAT = 2  # 1: the images inside the .pt (before the disk-backed cache)
CHUNK_BYTES = 32 * 2**20  # the most a copy or a whole-file read moves per call
RERUN = "rerun the preprocess stage (dvc repro preprocess)"


def available_memory() -> int:
    """Bytes of memory this process could still take: the machine's available memory (Linux's
    MemAvailable; else free pages), or less where a cgroup (a container's or a job's limit) leaves
    less: its limit less the anonymous memory charged to it (its page cache can be reclaimed)."""
    have = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
    except OSError:
        pass
    if have is None:
        have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limited = _cgroup_room()
    return have if limited is None else min(have, limited)


def _cgroup_room() -> int | None:
    """Our cgroup's memory limit less its anonymous memory, or None without a limit (v2 or v1)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if controllers == "":  # v2: memory.max, memory.stat's anon
            base, limit_file, stat_key = Path("/sys/fs/cgroup") / where.lstrip("/"), "memory.max", "anon"
        elif "memory" in controllers.split(","):  # v1
            base = Path("/sys/fs/cgroup/memory") / where.lstrip("/")
            limit_file, stat_key = "memory.limit_in_bytes", "rss"
        else:
            continue
        try:
            text = (base / limit_file).read_text().strip()
            stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if text == "max" or int(text) >= 2**60:
            continue
        return max(0, int(text) - int(stat.get(stat_key, 0)))
    return None


def chunk_rows(shape) -> int:
    """Images of `shape` (N, C, H, W) in one chunk of at most CHUNK_BYTES (at least one)."""
    return max(1, CHUNK_BYTES // max(1, int(np.prod(shape[1:]))))


def write_header(f, shape: tuple[int, ...]) -> None:
    """The .npy header of uint8 images of `shape`, C order (the data follows it)."""
    np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})


def images_path(meta: Path) -> Path:
    """Where the images of the split described by `meta` live: train.pt -> train.images.npy."""
    return meta.with_name(f"{meta.stem}.images.npy")


def _read_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    """Fill `view` from `fd` at `offset` (preadv may return less than asked: loop)."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ReprotuneError(f"{path}: shorter than its header says: {RERUN}")
        done += got


class CachedImages:
    """uint8 images (N, C, H, W) in a file, rows `index` of it (all, in order, when None), indexed
    like a tensor: `images[a:b]` and `images[idx]` read just those rows into a new CPU tensor (or into
    `out=`). Nothing is read until asked for, and nothing read is kept."""

    def __init__(self, path: Path, shape: tuple[int, ...], offset: int, index: np.ndarray | None = None):
        self.path, self.offset, self._file_shape = Path(path), offset, tuple(shape)
        self.index = index
        self.row_bytes = int(np.prod(shape[1:]))
        self._fd: int | None = None

    @classmethod
    def open(cls, path: Path) -> CachedImages:
        """The images of a `.npy` file written by `write_images` (or any C-order uint8 (N, C, H, W) one)."""
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
        except FileNotFoundError:
            raise ReprotuneError(f"{path}: processed images not found: {RERUN}") from None
        except (OSError, ValueError) as exc:
            raise ReprotuneError(f"{path}: not a processed image array ({exc}): {RERUN}") from None
        if dtype != np.uint8 or fortran or len(shape) != 4:
            raise ReprotuneError(f"{path}: not uint8 (N, C, H, W) images: {RERUN}")
        if path.stat().st_size != offset + int(np.prod(shape)):
            raise ReprotuneError(f"{path}: {path.stat().st_size:,} bytes, its header says "
                                 f"{offset + int(np.prod(shape)):,}: {RERUN}")
        return cls(path, shape, offset)

    # -- what a tensor of images would answer

    def __len__(self) -> int:
        return self._file_shape[0] if self.index is None else len(self.index)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self._file_shape[1:]))

    @property
    def nbytes(self) -> int:
        return len(self) * self.row_bytes

    ndim = 4
    dtype = torch.uint8
    device = torch.device("cpu")

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1 and self.index is None:
                return self.read(start, max(start, stop))
            return self.gather(np.arange(start, stop, step))
        if isinstance(key, int | np.integer):
            return self.gather(np.array([key]))[0]
        return self.gather(key)

    def select(self, rows) -> CachedImages:
        """Rows `rows` of these images, in that order, still on disk."""
        rows = np.asarray(rows, dtype=np.int64)
        return CachedImages(self.path, self._file_shape, self.offset, rows if self.index is None else self.index[rows])

    # -- reading

    def _descriptor(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                raise ReprotuneError(f"{self.path}: cannot read ({exc.strerror})") from None
            weakref.finalize(self, os.close, self._fd)
        return self._fd

    def _empty(self, n: int, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return torch.empty((n, *self._file_shape[1:]), dtype=torch.uint8)
        if len(out) < n or not out.is_contiguous():
            raise ValueError("out must be a contiguous buffer of at least the rows asked for")
        return out[:n]

    def read(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start..stop of the file, in one read (the images must not be a selection)."""
        assert self.index is None, "read() reads the file's own order; select()ed images gather"
        batch = self._empty(stop - start, out)
        if len(batch):
            _read_into(self._descriptor(), memoryview(batch.numpy()).cast("B"),
                       self.offset + start * self.row_bytes, self.path)
        return batch

    def gather(self, idx, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `idx` (positions in these images), in that order. Rows that follow each other in the
        file are read in one call, so a sorted selection reads as fast as a range."""
        idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        idx = idx % max(1, len(self))
        rows = idx if self.index is None else self.index[idx]
        batch = self._empty(len(rows), out)
        buffer = memoryview(batch.numpy()).cast("B")
        fd = self._descriptor()
        for first, last in _runs(rows):  # positions first..last-1 of the batch, consecutive in the file
            _read_into(fd, buffer[first * self.row_bytes:last * self.row_bytes],
                       self.offset + int(rows[first]) * self.row_bytes, self.path)
        return batch

    def load(self, pin: bool = False) -> torch.Tensor:
        """All of these images in memory (pinned for a GPU's asynchronous copies when `pin`)."""
        whole = torch.empty(tuple(self.shape), dtype=torch.uint8, pin_memory=pin)
        n = chunk_rows(self.shape)
        for start in range(0, len(self), n):
            stop = min(len(self), start + n)
            if self.index is None:
                self.read(start, stop, out=whole[start:stop])
            else:
                self.gather(np.arange(start, stop), out=whole[start:stop])
        return whole

    def flip(self, dim: int) -> FlippedImages:
        """These images mirrored along `dim` (3: left-right), as each batch is read."""
        return FlippedImages(self, dim)


class FlippedImages:
    """`images` mirrored along `dim` batch by batch (test-time augmentation on the disk cache)."""

    def __init__(self, images: CachedImages, dim: int):
        self.images, self.dim = images, dim

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> torch.Tensor:
        return self.images[key].flip(self.dim)


def batches(images, n: int) -> Iterator[torch.Tensor]:
    """Images (a tensor or CachedImages) in order, `n` at a time. From the cache each batch is read
    into the same buffer, valid until the next one is asked for: a new buffer a batch (16 MB at 224 px)
    left glibc's heap fragmented, and a long evaluation's peak memory crept up batch by batch."""
    if not isinstance(images, CachedImages):
        yield from (images[start:start + n] for start in range(0, len(images), n))
        return
    buffer = torch.empty((min(n, len(images)), *images.shape[1:]), dtype=torch.uint8)
    for start in range(0, len(images), n):
        stop = min(len(images), start + n)
        if images.index is None:
            yield images.read(start, stop, out=buffer)
        else:
            yield images.gather(np.arange(start, stop), out=buffer)


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) spans of `rows` where each row is the one before plus one."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    edges = [0, *breaks.tolist(), len(rows)]
    return list(zip(edges[:-1], edges[1:], strict=False))


def write_images(path: Path, images, chunk: int | None = None) -> None:
    """Write `images` (a tensor, an array or CachedImages: anything that slices into uint8 (n, C, H, W)
    rows) to `path` as a `.npy` array, `chunk` images at a time."""
    with open(path, "wb") as f:
        write_header(f, tuple(int(s) for s in images.shape))
        for block in in_chunks(images, chunk):
            f.write(memoryview(block).cast("B"))


def as_numpy(block) -> np.ndarray:
    """A slice of images (tensor or array) as a C-contiguous uint8 array."""
    return np.ascontiguousarray(block.numpy() if isinstance(block, torch.Tensor) else block, dtype=np.uint8)


def in_chunks(images, rows_per_chunk: int | None = None) -> Iterator[np.ndarray]:
    """Any images (tensor, array, CachedImages) in order as uint8 arrays, a bounded number at a time."""
    n = rows_per_chunk or chunk_rows(images.shape)
    for start in range(0, len(images), n):
        yield as_numpy(images[start:start + n])
