"""The one place that chooses the device and the autocast dtype."""

from __future__ import annotations

import torch

from reprotune.errors import ReprotuneError


def select_device(spec: str, local_rank: int | None = None) -> torch.device:
    """`auto` -> CUDA when present else CPU; `cuda`/`cuda:N` must exist, or a clear error.

    Under torchrun (`local_rank` given) `auto` and `cuda` mean this process's own GPU, cuda:local_rank.
    """
    asked = spec
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and local_rank is not None:
        spec = f"cuda:{local_rank}"
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


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `train.amp`: auto = fp16 on CUDA, none on CPU (bf16 autocast is slow here)."""
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]
