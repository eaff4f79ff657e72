"""The data: fetch or synthesize the archive, read it without trusting it, split, augment.

CIFAR archives are read here: CIFAR-10's official layout (`cifar-10-batches-py/data_batch_1..5`,
`test_batch`, `batches.meta`) and CIFAR-100's (`cifar-100-python/train`, `test`, `meta`), each
member a pickle of a dict holding a uint8 (N, 3072) array in R,G,B plane order. The synthetic
dataset is written in CIFAR-10's layout, so it goes through exactly the code real data takes.
Folder trees of image files, and archives of them, are read by `folders.py`.
"""

from __future__ import annotations

import gzip
import http.client
import io
import pickle
import shutil
import socket
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from tensorboardX import SummaryWriter
from tqdm import tqdm

from reprotune import tb
from reprotune.config import CIFAR_SIDE, DOWNLOADED, DataConfig
from reprotune.errors import ReprotuneError
from reprotune.io import atomic_file, file_md5, load_torch

SIDE = CIFAR_SIDE  # CIFAR images are 3x32x32
ROW = 3 * SIDE * SIDE  # one image as stored in a batch: 3072 bytes, R plane then G then B
MAX_MEMBER_BYTES = 512 * 2**20  # CIFAR-100's train member pickles to ~155 MB; refuse absurd members
MAX_MEMBERS = 64  # the official archives have 5 to 8 entries
CHUNK = 1 << 20


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


# --------------------------------------------------------------------------- fetching


RETRIES = 4  # further attempts after a dropped, stalled or refused connection, or an HTTP 5xx
BACKOFF_SECONDS = 2.0  # wait before retry k (from 0): BACKOFF_SECONDS * 2**k, so 2, 4, 8, 16 s
TIMEOUT_SECONDS = 60.0  # a connection or read that waits longer than this has stalled
OFFLINE_HINT = ("without a network, set data.url to a local copy of the archive (a path or file:// URL), "
                "or run `make demo` for the offline synthetic dataset")


class _Transient(Exception):
    """A failure worth retrying: the connection dropped, stalled or was refused, or the server erred."""


def fetch_archive(url: str, md5: str, dest: Path) -> dict:
    """Copy or download `url` to `dest` with a progress bar; rename into place only if md5 matches.

    HTTP downloads that drop or stall are retried with exponential backoff and resume where they
    stopped when the server honours Range requests. The partial file never has the final name.
    """
    started = time.perf_counter()
    with atomic_file(dest) as tmp:
        for attempt in range(RETRIES + 1):
            try:
                _transfer(url, tmp)
                break
            except _Transient as exc:
                if attempt == RETRIES:
                    raise ReprotuneError(f"cannot download {url} after {RETRIES + 1} attempts ({exc}): "
                                         f"{OFFLINE_HINT}") from None
                wait = BACKOFF_SECONDS * 2**attempt
                tqdm.write(f"{url}: {exc}; retry {attempt + 1}/{RETRIES} in {wait:.0f} s")
                time.sleep(wait)
        digest = file_md5(tmp)
        if digest != md5:
            raise ReprotuneError(f"{url}: md5 {digest} does not match data.md5 {md5}; the file was discarded")
        size = tmp.stat().st_size
    return {"url": url, "md5": digest, "bytes": size, "attempts": attempt + 1,
            "seconds": time.perf_counter() - started}


def _transfer(url: str, tmp: Path) -> None:
    """Bring `tmp` up to the whole of `url`, appending to what an earlier attempt got if possible."""
    if "://" not in url or url.startswith("file://"):
        path = Path(urllib.request.url2pathname(url.removeprefix("file://")))
        try:
            with path.open("rb") as source, tmp.open("wb") as out:
                _copy(source, out, path.stat().st_size, 0, url)
        except OSError as exc:
            raise ReprotuneError(f"{url}: cannot read local archive: {exc.strerror or exc}") from None
        return
    have = tmp.stat().st_size
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)  # noqa: S310 - the user's URL
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise ReprotuneError(f"{url}: server answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, socket.gaierror):  # no DNS: offline, retrying will not help
            raise ReprotuneError(f"cannot reach {url} ({exc.reason}): {OFFLINE_HINT}") from None
        raise _Transient(str(exc.reason)) from None
    except OSError as exc:  # a timeout while connecting
        raise _Transient(str(exc) or type(exc).__name__) from None
    with response:
        resumed = have > 0 and response.status == 206
        length = response.headers.get("Content-Length")
        total = int(length) + (have if resumed else 0) if length and length.isdigit() else None
        with tmp.open("ab" if resumed else "wb") as out:
            _copy(response, out, total, have if resumed else 0, url)


def _copy(source: BinaryIO, out: BinaryIO, total: int | None, start: int, label: str) -> None:
    size = start
    with tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=Path(label).name, leave=False,
              disable=None) as bar:
        try:
            while chunk := source.read1(CHUNK):  # what has arrived: a stall keeps the bytes before it
                out.write(chunk)
                size += len(chunk)
                bar.update(len(chunk))
        except (http.client.HTTPException, TimeoutError, ConnectionError) as exc:
            raise _Transient(f"connection lost after {size:,} bytes ({type(exc).__name__})") from None
    if total is not None and size != total:
        raise _Transient(f"got {size:,} of {total:,} bytes")


# --------------------------------------------------------------------------- synthetic data

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


# --------------------------------------------------------------------------- reading the archive

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


@dataclass
class RawData:
    """A dataset's images: uint8 (N, 3, S, S), int64 labels (N,), class names; `skipped` lists the
    files that could not be read (folder datasets), as `path: reason`."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    skipped: list[str] = field(default_factory=list)


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


# --------------------------------------------------------------------------- splits


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


# --------------------------------------------------------------------------- augmentation


# What fills the pixels a crop or a rotation brings in from outside the image (`train.padding_mode`).
# reflect (mirror the pixels inside, edge not repeated: numpy's and airbench's crop padding) and edge
# (repeat the border) only show what the image has; mean fills each image with its own mean colour,
# zero with black, the old default, which draws borders data with a light background never has.
PADDING_MODES = ("reflect", "edge", "mean", "zero")


def augment(images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator,
            part: tuple[int, int] = (0, 1), rotation: float = 0.0, jitter: float = 0.0,
            mode: str = "reflect") -> torch.Tensor:
    """A uint8 batch randomly cropped, flipped, rotated and colour-jittered on its device, returned as
    the models' float32 [0, 1] input.

    Crop (a window of the image padded by `padding` px, filled per `mode`) and flip move uint8
    pixels, a quarter of float32's bytes; rotation (uniform in +-`rotation` degrees, corners filled
    per `mode`) and jitter (strength `jitter`) need floats, so they follow the conversion. A setting
    of 0 draws nothing from `generator`: with rotation and jitter at 0, the draws, and so a whole
    run, are exactly those of crop and flip alone. `mode` draws nothing either.

    `part=(k, n)`: `images` is the k-th of n equal slices of a larger batch (one rank's share of a
    global batch). The random draws are made for the whole batch, so each slice gets exactly what it
    would get augmented as one batch, and every rank's generator stays in step.
    """
    n, c, h, w = images.shape
    device = images.device
    k, parts = part
    mine = slice(k * n, (k + 1) * n)
    fill = images.float().mean((2, 3), keepdim=True) if mode == "mean" else None  # (N, C, 1, 1), 0-255
    if padding:
        dy = torch.randint(0, 2 * padding + 1, (n * parts, 1), device=device, generator=generator)[mine]
        dx = torch.randint(0, 2 * padding + 1, (n * parts, 1), device=device, generator=generator)[mine]
        rows = dy - padding + torch.arange(h, device=device)  # (N, H): source rows, some outside [0, h)
        cols = dx - padding + torch.arange(w, device=device)  # (N, W)
        cropped = images[torch.arange(n, device=device)[:, None, None, None], torch.arange(c, device=device)[
            None, :, None, None], _source(rows, h, mode)[:, None, :, None], _source(cols, w, mode)[:, None, None, :]]
        if mode in ("zero", "mean"):  # one gather, then the window's outside filled
            inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
            outside = torch.zeros((), dtype=images.dtype, device=device) if fill is None \
                else fill.round().to(images.dtype)
            cropped = torch.where(inside, cropped, outside)
        images = cropped  # (N, C, H, W)
    if hflip:
        flip = torch.rand(n * parts, device=device, generator=generator)[mine] < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    x = to_float(images)
    if rotation:
        uniform = torch.rand(n * parts, device=device, generator=generator)[mine]  # (N,) in [0, 1)
        x = rotate(x, (2 * uniform - 1) * rotation, mode, None if fill is None else fill / 255)
    if jitter:
        uniform = torch.rand(n * parts, 3, device=device, generator=generator)[mine]  # (N, 3) in [0, 1)
        x = jitter_colours(x, 1 + (2 * uniform - 1) * jitter)
    return x


def _source(index: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Where each position of a padded window reads inside [0, size): mirrored for reflect,
    clamped to the border otherwise (zero and mean then overwrite what lies outside)."""
    if mode == "reflect":
        period = 2 * (size - 1)  # a mirror about both edges, the edge pixel not repeated
        index = index.remainder(period)
        index = torch.where(index >= size, period - index, index)
    return index.clamp(0, size - 1)


GRID_PADDING = {"reflect": "reflection", "edge": "border", "mean": "zeros", "zero": "zeros"}


def rotate(images: torch.Tensor, degrees: torch.Tensor, mode: str = "reflect",
           fill: torch.Tensor | None = None) -> torch.Tensor:
    """Float images (N, C, H, W) each turned `degrees[i]` anticlockwise about its centre (as
    torchvision's `rotate`): one bilinear `grid_sample` for the batch. Where no pixel lands, `mode`
    decides: mirrored (reflect), the nearest border pixel (edge), `fill` (N, C, 1, 1) for mean,
    or zeros."""
    n, _, h, w = images.shape
    angle = torch.deg2rad(degrees.to(images.dtype))
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    # affine_grid maps each output position to where it samples the input, in [-1, 1] coordinates
    # (x right, y down): the inverse rotation, with h/w and w/h keeping a non-square image's angles.
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1),
                         torch.stack([sin * w / h, cos, zero], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)  # (N, H, W, 2)
    if mode == "mean" and fill is not None:  # zeros around (image - fill) are fill around the image
        return F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=GRID_PADDING[mode], align_corners=False)


# ITU-R 601 luma, the weights of torchvision's rgb_to_grayscale
GREY = (0.2989, 0.587, 0.114)


def jitter_colours(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Float RGB images (N, 3, H, W) in [0, 1] with brightness, contrast and saturation scaled by
    `factors` (N, 3), in that order, clamped to [0, 1] after each, as torchvision's ColorJitter
    does (it shuffles the order per call; a fixed one keeps the batch one op per adjustment)."""
    brightness, contrast, saturation = factors.T[:, :, None, None, None]  # each (N, 1, 1, 1)
    grey = torch.tensor(GREY, dtype=images.dtype, device=images.device)[:, None, None]  # (3, 1, 1)
    x = (images * brightness).clamp_(0, 1)
    mean = (x * grey).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # (N, 1, 1, 1): mean luma
    x = torch.lerp(mean, x, contrast).clamp_(0, 1)
    luma = (x * grey).sum(1, keepdim=True)  # (N, 1, H, W)
    return torch.lerp(luma, x, saturation).clamp_(0, 1)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1], the models' input contract."""
    return images.float().div_(255)



# --------------------------------------------------------------------------- stage entry points


def download(cfg: DataConfig, writer: SummaryWriter) -> dict:
    """The download stage: fetch the archive (md5-checked) or synthesize it into DOWNLOADED, then
    log what arrived. A local image tree (dataset folder with `path`) needs nothing fetched: the
    directory is left empty and preprocess reads the tree, a DVC dependency of its own."""
    started = time.perf_counter()
    out = Path(DOWNLOADED)
    archive = cfg.archive
    if cfg.dataset == "synthetic":
        info = write_synthetic_archive(archive, cfg.synthetic_train, cfg.synthetic_test, cfg.synthetic_seed)
    elif archive is not None:
        info = fetch_archive(*cfg.source, archive)
    else:
        out.mkdir(parents=True, exist_ok=True)
        info = {"url": None, "path": cfg.path, "md5": None, "bytes": 0, "seconds": time.perf_counter() - started}
    for stale in out.iterdir():  # another dataset's archive, from a run outside DVC
        if archive is None or stale.name != archive.name:
            stale.unlink() if stale.is_file() or stale.is_symlink() else shutil.rmtree(stale)
    info["dataset"] = cfg.dataset
    tb.log_table(writer, "download/archive", ["dataset", "source", "md5", "bytes", "seconds"],
                 [[cfg.dataset, info["url"] or cfg.path, info["md5"] or "-", info["bytes"], f"{info['seconds']:.2f}"]])
    writer.add_scalar("download/megabytes", info["bytes"] / 2**20, 0)
    writer.add_scalar("download/seconds", info["seconds"], 0)
    return info


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
        tb.log_samples(writer, f"{name}/samples", split.images, split.labels, classes, log_images)
        writer.add_histogram(f"{name}/labels", split.labels.numpy(), 0, bins=np.arange(len(classes) + 1) - 0.5)
        writer.add_scalar(f"{name}/images", len(split.labels), 0)
    tb.log_table(writer, "class_counts", ["class", *splits],
                 [[c, *(counts[s][i] for s in splits)] for i, c in enumerate(classes)])
    mean, std = splits["train"].mean, splits["train"].std
    tb.log_table(writer, "normalization", ["", "R", "G", "B"],
                 [["mean", *(f"{m:.4f}" for m in mean)], ["std", *(f"{s:.4f}" for s in std)]])
    writer.add_scalar("skipped_images", len(raw.skipped), 0)
    metrics = {"classes": len(classes), "image_size": int(splits["train"].images.shape[-1]),
               "mean": mean, "std": std, "seconds": time.perf_counter() - started,
               **{f"{name}_images": len(s.labels) for name, s in splits.items()},
               "skipped_images": len(raw.skipped)}
    return splits, metrics
