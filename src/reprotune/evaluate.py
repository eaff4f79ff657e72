"""Evaluation: batched prediction on uint8 tensors and the metrics a reviewer reads."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tensorboardX import SummaryWriter
from torch import nn

from reprotune import tb
from reprotune.data import Split, to_float


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int,
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
    return loss, (logits.argmax(1) == labels).float().mean().item()


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): rows actual, columns predicted."""
    return np.bincount(actual * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """test_acc, test_loss, macro_f1 and per-class accuracy (recall) for `evaluate.json`."""
    loss, acc = loss_and_accuracy(logits, labels)
    matrix = confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), len(classes))
    true_pos = np.diag(matrix).astype(np.float64)
    actual, predicted = matrix.sum(1), matrix.sum(0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return {"test_acc": acc, "test_loss": loss, "macro_f1": float(f1.mean()),
            "class_acc": {name: float(r) for name, r in zip(classes, recall, strict=True)}}


def confusion_rows(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> pd.DataFrame:
    """One row per image: actual and predicted class names (DVC's confusion template)."""
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame({"actual": names[labels.numpy()], "predicted": names[logits.argmax(1).numpy()]})


def evaluate_model(model: nn.Module, test: Split, batch_size: int, writer: SummaryWriter) -> tuple[dict, pd.DataFrame]:
    """Metrics and per-image confusion rows on the test split, logged to TensorBoard too."""
    logits = predict(model, test.images, batch_size)
    metrics = classification_metrics(logits, test.labels, test.classes)
    rows = confusion_rows(logits, test.labels, test.classes)
    writer.add_scalar("test/loss", metrics["test_loss"], 0)
    writer.add_scalar("test/acc", metrics["test_acc"], 0)
    writer.add_scalar("test/macro_f1", metrics["macro_f1"], 0)
    for name, acc in metrics["class_acc"].items():
        writer.add_scalar(f"test_class_acc/{name}", acc, 0)
    matrix = confusion_matrix(test.labels.numpy(), logits.argmax(1).numpy(), len(test.classes))
    tb.log_confusion(writer, "test/confusion_matrix", matrix, test.classes)
    return metrics, rows
