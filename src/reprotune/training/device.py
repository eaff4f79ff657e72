"""The one place that chooses the device and the autocast dtype."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from reprotune.errors import ReprotuneError

# cuBLAS is deterministic only with a fixed workspace, which it reads from the environment when it
# starts (torch refuses matmuls in deterministic mode without it). ":4096:8" is 8 buffers of 4 MiB.
CUBLAS_DETERMINISTIC = ":4096:8"


def select_device(spec: str, local_rank: int | None = None) -> torch.device:
    """`auto` -> CUDA when present else CPU; `cuda`/`cuda:N` must exist, or a clear error.

    Under torchrun (`local_rank` given) `auto` and `cuda` mean this process's own GPU, cuda:local_rank.
    Otherwise, on a machine with several GPUs, they mean a GPU no other reprotune run holds, so that
    queued experiments running side by side (`dvc queue start -j N`) spread over the GPUs.
    """
    asked = spec
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and local_rank is not None:
        spec = f"cuda:{local_rank}"
    elif spec == "cuda" and torch.cuda.device_count() > 1:
        spec = f"cuda:{claim_gpu(torch.cuda.device_count())}"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ReprotuneError(f"train.device={asked} but this machine has no CUDA device "
                                 "(use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ReprotuneError(f"train.device={spec} but only {torch.cuda.device_count()} "
                                 "CUDA device(s) exist" + (" (one GPU per process: lower train.nproc)"
                                                          if local_rank is not None else ""))
    return device


def set_deterministic(on: bool) -> None:
    """`train.deterministic`: torch's deterministic algorithms, set both ways so the setting never
    leaks between runs in one process. Call before the run's first CUDA work: on CUDA, cuBLAS also
    needs CUBLAS_WORKSPACE_CONFIG, which is set here unless the user chose a value already."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    torch.use_deterministic_algorithms(on)


def check_deterministic(step: Callable[[], None]) -> None:
    """Run one trial training `step` (on a copy of the model) under deterministic mode, so that an
    op without a deterministic kernel on this device stops the run before it trains, with one line
    naming the op and the setting, rather than raising mid-epoch."""
    try:
        step()
    except RuntimeError as exc:
        message = str(exc)
        if "deterministic" not in message.lower():
            raise
        op = re.search(r"(\S+) does not have a deterministic implementation", message)
        if op:
            raise ReprotuneError(f"train.deterministic=true, but {op.group(1)} has no deterministic "
                                 "implementation on this device: set train.deterministic to false") from None
        if "CUBLAS_WORKSPACE_CONFIG" in message:
            raise ReprotuneError(f"train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG={CUBLAS_DETERMINISTIC} "
                                 "(or :16:8) in the environment; it is "
                                 f"{os.environ.get('CUBLAS_WORKSPACE_CONFIG')!r}") from None
        raise ReprotuneError(f"train.deterministic=true: {' '.join(message.split())[:300]}") from None


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `train.amp`: auto = fp16 on CUDA, none on CPU (bf16 autocast is slow here)."""
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]


_HELD: list[int] = []  # descriptors of the GPU lock files this process holds, until it exits


def claim_gpu(count: int, lock_dir: Path | None = None) -> int:
    """The first of `count` GPUs that no other reprotune process holds, now held by this one (an
    exclusive flock, which the kernel releases when the process ends, however it ends). When every
    GPU is held, GPU 0, shared."""
    import fcntl  # POSIX; only reached on machines with several GPUs

    lock_dir = Path(lock_dir or tempfile.gettempdir())
    for index in range(count):
        try:
            fd = os.open(lock_dir / f"reprotune-gpu{index}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # e.g. another user's lock file: treat that GPU as held
            continue
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)  # other users' runs must be able to lock it too
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _HELD.append(fd)
        return index
    return 0
