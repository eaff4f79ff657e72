"""Scoring a model on uint8 images in batches: logits, loss and accuracy. The training loop's validation,
the test report, compression and export all measure through these.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from reprotune.data.splits import to_float


@torch.no_grad()
def batched_logits(model: nn.Module, images: torch.Tensor, batch_size: int,
            autocast: torch.dtype | None = None) -> torch.Tensor:
    """Logits (N, classes) float32 on CPU for uint8 images (N, 3, H, W), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = to_float(images[start:start + batch_size].to(device, non_blocking=True))
        with _autocast(device, autocast):
            outputs.append(model(batch).float())
    model.train(was_training)
    return torch.cat(outputs).cpu() if outputs else torch.empty(0, 0)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (a fraction)."""
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).double().mean().item()  # exact: 0.4, not 0.40000000596

