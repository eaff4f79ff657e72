"""How the training images reach the device (`train.data_on`): all of them on the device, all in
(pinned) host memory with each batch gathered there, or left in the disk cache with each batch read
by index on a background thread, a few batches ahead of the step that needs it.

Whichever way, a step gets the same uint8 batch, so training is the same bit for bit (on a CPU; on a
GPU too, as long as the kernels are deterministic).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator

import torch

from reprotune.config import TrainConfig
from reprotune.data.cache import CachedImages, available_memory
from reprotune.data.splits import Split

# GPU memory kept free for the model, activations and cuDNN workspaces when deciding whether the
# cached images fit on the device: the larger of RESERVE_BYTES and RESERVE_SHARE of the GPU.
RESERVE_BYTES = 2 * 2**30
RESERVE_SHARE = 0.25
# Host memory the images may take, with `auto`: this share of what is available (the rest is the
# model, the optimizer, the page cache the disk path would read through, and everyone else's).
HOST_SHARE = 0.5
# A training step's own host memory, in float copies of its batch (the float input, the crop and
# flip, the resize to model.image_size, gradients through them): counted beside the images, so that
# 224 px batches of 128 (about 0.6 GB of copies) do not push images that "fit" past a memory cap.
STEP_COPIES = 8
PREFETCH = 4  # batches read ahead of the step, with `disk`


def images_fit(nbytes: int, device: torch.device, step_bytes: int = 0) -> bool:
    """Whether `nbytes` of images fit on `device` beside training (a CPU's memory: host_fits)."""
    if device.type != "cuda":
        return host_fits(nbytes, step_bytes)
    free, total = torch.cuda.mem_get_info(device)
    return nbytes <= free - max(RESERVE_BYTES, RESERVE_SHARE * total)


def host_fits(nbytes: int, step_bytes: int = 0) -> bool:
    """Whether every training process on this machine can hold `nbytes` of images in host memory,
    beside a step's `step_bytes`."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's ranks on this machine
    return (nbytes + step_bytes) * processes <= HOST_SHARE * available_memory()


def _in_memory(images: torch.Tensor | CachedImages, pin: bool = False) -> torch.Tensor:
    if isinstance(images, CachedImages):
        return images.load(pin=pin)
    return images.pin_memory() if pin else images


def place(train: Split, val: Split, cfg: TrainConfig, device: torch.device, announce: bool
          ) -> tuple[torch.Tensor | HostImages | DiskImages, torch.Tensor | CachedImages]:
    """The training and validation images where `cfg.data_on` says (`auto`: on the device if they
    fit there, else in host memory if they fit there, else read from the disk cache)."""
    nbytes = train.images.nbytes + val.images.nbytes
    step_bytes = STEP_COPIES * cfg.batch_size * 4 * int(math.prod(train.images.shape[1:]))
    where = cfg.data_on
    if where == "auto":
        # On a CPU the device is the host: images that fit its memory are a plain tensor there.
        where = ("device" if images_fit(nbytes, device, step_bytes)
                 else "host" if device.type == "cuda" and host_fits(nbytes) else "disk")  # its steps run on the GPU
    if where == "disk" and not isinstance(train.images, CachedImages):
        where = "host"  # images already in memory (splits made in this process, not the cache)
    if where == "device":
        return _in_memory(train.images).to(device), _in_memory(val.images).to(device)
    pin = device.type == "cuda"
    if where == "host":
        if announce and device.type == "cuda":
            print(f"training from pinned host memory: {nbytes / 2**30:.1f} GiB of images "
                  f"(train.data_on: {cfg.data_on})", flush=True)
        return HostImages(_in_memory(train.images, pin), device), _in_memory(val.images, pin)
    if announce:
        print(f"training from the disk cache {train.images.path.parent}/: {nbytes / 2**30:.1f} GiB of images, "
              f"{available_memory() / 2**30:.1f} GiB of memory available (train.data_on: {cfg.data_on})",
              flush=True)
    return DiskImages(train.images, device), val.images


class HostImages:
    """uint8 images (N, C, H, W) kept in host memory (pinned, for a GPU), indexed like a tensor on
    `device`: `images[idx]` gathers the batch on the host with one index_select into a pinned
    buffer and copies it to the device asynchronously. Two buffers alternate, so the next batch is
    gathered while the last one's copy may still be in flight; no per-sample Python anywhere."""

    def __init__(self, images: torch.Tensor, device: torch.device):
        self.pinned = device.type == "cuda"
        self.images = images.pin_memory() if self.pinned and not images.is_pinned() else images
        self.device = device
        self.shape = images.shape
        self.dtype = images.dtype
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        k, self._turn = self._turn, self._turn ^ 1
        if self._copied[k] is not None:
            self._copied[k].synchronize()  # this buffer's previous batch has reached the device
        idx = idx.cpu()  # the epoch's order lives on the device: one small copy back per step
        buffer = self._buffers[k]
        if buffer is None or len(buffer) < len(idx):
            buffer = self._buffers[k] = torch.empty((len(idx), *self.shape[1:]), dtype=self.dtype,
                                                    pin_memory=self.pinned)
        batch = torch.index_select(self.images, 0, idx, out=buffer[:len(idx)])
        on_device = batch.to(self.device, non_blocking=True)
        if self.pinned:
            self._copied[k] = torch.cuda.Event()
            self._copied[k].record()
        return on_device


class DiskImages:
    """The disk cache's images, indexed like a tensor on `device` (`images[idx]` reads the batch and
    copies it there), and streamed: `prefetched` reads each step's batch on a background thread,
    PREFETCH batches ahead, into reused (pinned) buffers. The reads are `preadv` calls, which let go
    of the GIL, so the thread runs beside the step; each rank reads only its own indices."""

    def __init__(self, images: CachedImages, device: torch.device, ahead: int = PREFETCH):
        self.images, self.device, self.ahead = images, device, ahead
        self.pinned = device.type == "cuda"
        self.shape, self.dtype, self.nbytes = images.shape, images.dtype, images.nbytes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images.gather(idx).to(self.device)

    @contextlib.contextmanager
    def prefetched(self, batches: list[torch.Tensor]) -> Iterator[Iterator[torch.Tensor]]:
        """The images of each index tensor in `batches` (CPU), on the device, in order. The
        background thread stops when the block ends, however it ends."""
        free: queue.Queue = queue.Queue()
        ready: queue.Queue = queue.Queue()
        size = max((len(b) for b in batches), default=0)
        for _ in range(self.ahead + 1):  # one more than the read-ahead: the batch the step holds
            free.put((torch.empty((size, *self.shape[1:]), dtype=self.dtype, pin_memory=self.pinned), None))
        closing = threading.Event()

        def read() -> None:
            try:
                for idx in batches:
                    buffer, copied = free.get()
                    if closing.is_set():
                        return
                    if copied is not None:
                        copied.synchronize()  # the buffer's last batch has reached the GPU
                    ready.put((self.images.gather(idx, out=buffer), buffer))
            except BaseException as exc:  # noqa: BLE001 - raised again in the training thread
                ready.put((exc, None))

        reader = threading.Thread(target=read, name="reprotune-disk-reader", daemon=True)
        reader.start()

        def stream() -> Iterator[torch.Tensor]:
            for _ in batches:
                batch, buffer = ready.get()
                if isinstance(batch, BaseException):
                    raise batch
                on_device = batch.to(self.device, non_blocking=self.pinned)
                copied = None
                if self.pinned:
                    copied = torch.cuda.Event()
                    copied.record()
                yield on_device
                free.put((buffer, copied))  # the step is done with it (on a CPU it was the batch itself)

        try:
            yield stream()
        finally:
            closing.set()
            free.put((None, None))  # wakes a reader waiting for a buffer
            reader.join()


@contextlib.contextmanager
def epoch_batches(images: torch.Tensor | HostImages | DiskImages, order: torch.Tensor, steps: range,
            batch_size: int, part: Callable[[torch.Tensor], torch.Tensor]
            ) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """(this rank's indices, their uint8 images on the training device) for each step in `steps` of
    an epoch shuffled as `order`: `part` picks this rank's slice of each global batch."""
    def indices(order: torch.Tensor) -> list[torch.Tensor]:
        return [part(order[s * batch_size:(s + 1) * batch_size]) for s in steps]

    if isinstance(images, DiskImages):
        # The whole epoch's order to the CPU once, not a device sync per step in the reader.
        idx = indices(order.cpu())
        with images.prefetched(idx) as stream:
            yield zip(idx, stream, strict=True)
        return
    yield ((i, images[i]) for i in indices(order))

