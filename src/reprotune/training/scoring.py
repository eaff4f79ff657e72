"""Scoring a model on uint8 images in batches: logits, loss and accuracy. The training loop's validation,
the test report, compression and export all measure through these.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from reprotune.data.cache import batches
from reprotune.data.splits import to_float


@torch.no_grad()
def batched_logits(model: nn.Module, images: torch.Tensor, batch_size: int,
            autocast: torch.dtype | None = None) -> torch.Tensor:
    """Logits (N, classes) float32 on CPU for uint8 images (N, 3, H, W), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for pixels in batches(images, batch_size):
        batch = to_float(pixels.to(device, non_blocking=True))
        with _autocast(device, autocast):
            outputs.append(model(batch).float())
    model.train(was_training)
    return torch.cat(outputs).cpu() if outputs else torch.empty(0, 0)


FLOAT_BATCH_BYTES = 64 * 2**20  # float input per batch where the caller picks the batch: 256 images at
                                # 32 px (3 MB), 106 at 224 px (256 would be 154 MB, and ONNX Runtime's
                                # arena keeps about twice a batch's input once it has run one)


def float_batch(images, most: int) -> int:
    """Images per batch: `most`, or fewer where their float32 copies would pass FLOAT_BATCH_BYTES."""
    per_image = 4 * int(math.prod(images.shape[1:]))
    return max(1, min(most, FLOAT_BATCH_BYTES // per_image))


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (a fraction)."""
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).double().mean().item()  # exact: 0.4, not 0.40000000596

