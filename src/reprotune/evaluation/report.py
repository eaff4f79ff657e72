"""The test report a reviewer reads: accuracy, top-k, macro F1, per-class figures, the confusion matrix
and calibration (reliability), with optional test-time augmentation, written to TensorBoard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tensorboardX import SummaryWriter
from torch import nn

from reprotune.config import EvaluateConfig
from reprotune.data.splits import Split
from reprotune.tracking import tensorboard
from reprotune.training.scoring import batched_logits, loss_and_accuracy


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): rows actual, columns predicted."""
    return np.bincount(actual * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of images whose class is among the k highest logits."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(1).double().mean().item()


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> tuple[pd.DataFrame, float]:
    """Calibration: per confidence bin, mean confidence vs accuracy, and the expected calibration
    error (ECE = sum over bins of |accuracy - confidence| weighted by the bin's share of images)."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence can be no lower than 1/classes.
    index = (confidence.double() * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=confidence.double(), minlength=bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=bins)
    seen = count > 0
    frame = pd.DataFrame({
        "bin_upper": (torch.arange(1, bins + 1) / bins).numpy(),
        "confidence": torch.where(seen, conf_sum / count.clamp(min=1), torch.nan).numpy(),
        "accuracy": torch.where(seen, acc_sum / count.clamp(min=1), torch.nan).numpy(),
        "count": count.long().numpy(),
    })
    ece = ((acc_sum - conf_sum).abs().sum() / len(labels)).item()
    return frame, ece


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], bins: int = 15) -> dict:
    """Everything `evaluate.json` reports: loss, top-1/top-5, macro F1, ECE, per-class P/R/F1."""
    loss, acc = loss_and_accuracy(logits, labels)
    matrix = confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), len(classes))
    true_pos = np.diag(matrix).astype(np.float64)
    actual, predicted = matrix.sum(1), matrix.sum(0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    _, ece = reliability(logits.softmax(1), labels, bins)

    def per_class(values: np.ndarray) -> dict[str, float]:
        return {name: float(v) for name, v in zip(classes, values, strict=True)}

    return {"test_acc": acc, "macro_f1": float(f1.mean()), "test_loss": loss,
            "test_top5_acc": top_k_accuracy(logits, labels, 5), "ece": ece,
            "class_acc": per_class(recall), "class_precision": per_class(precision), "class_f1": per_class(f1),
            "class_support": {name: int(n) for name, n in zip(classes, actual, strict=True)}}


def tta_logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Test-time augmentation: the mean of the logits for each image and its horizontal mirror."""
    return (batched_logits(model, images, batch_size) + batched_logits(model, images.flip(3), batch_size)) / 2


def confusion_rows(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> pd.DataFrame:
    """One row per image: actual and predicted class names (DVC's confusion template)."""
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame({"actual": names[labels.numpy()], "predicted": names[logits.argmax(1).numpy()]})


@dataclass
class Evaluation:
    """What the evaluate stage writes."""

    metrics: dict  # metrics/evaluate.json: headline numbers first, then per-class accuracy (recall)
    per_class: pd.DataFrame  # metrics/classes.csv: class, precision, recall, f1, support
    confusion: pd.DataFrame  # metrics/confusion.csv: actual, predicted per test image
    reliability: pd.DataFrame  # metrics/reliability.csv: confidence vs accuracy per bin


def evaluate_model(model: nn.Module, test: Split, cfg: EvaluateConfig, writer: SummaryWriter) -> Evaluation:
    """Metrics on the test split (plus flip TTA when asked), logged to TensorBoard too."""
    logits = batched_logits(model, test.images, cfg.batch_size)
    metrics = classification_metrics(logits, test.labels, test.classes, cfg.calibration_bins)
    if cfg.tta:
        tta = classification_metrics(tta_logits(model, test.images, cfg.batch_size), test.labels, test.classes)
        metrics["tta"] = {"test_acc": tta["test_acc"], "test_loss": tta["test_loss"], "macro_f1": tta["macro_f1"],
                          "acc_gain": tta["test_acc"] - metrics["test_acc"]}
    probs = logits.softmax(1)
    frame, _ = reliability(probs, test.labels, cfg.calibration_bins)
    _log_evaluation(writer, metrics, logits, test, frame, cfg.misclassified_images)
    # Precision, F1 and support per class are a table to read (and plot), not columns for
    # `dvc exp show`: evaluate.json keeps the per-class accuracy only.
    per_class = pd.DataFrame({"class": test.classes, **{key: list(metrics.pop(f"class_{key}").values())
                                                        for key in ("precision", "f1", "support")}})
    per_class.insert(2, "recall", list(metrics["class_acc"].values()))
    return Evaluation(metrics, per_class, confusion_rows(logits, test.labels, test.classes), frame)


def _log_evaluation(writer: SummaryWriter, metrics: dict, logits: torch.Tensor, test: Split,
                    frame: pd.DataFrame, misclassified: int) -> None:
    for key in ("test_loss", "test_acc", "test_top5_acc", "macro_f1", "ece"):
        writer.add_scalar(f"test/{key.removeprefix('test_')}", metrics[key], 0)
    if "tta" in metrics:
        writer.add_scalar("test/tta_acc", metrics["tta"]["test_acc"], 0)
    for name in test.classes:
        writer.add_scalar(f"test_class_f1/{name}", metrics["class_f1"][name], 0)  # logged before the split
    predicted = logits.argmax(1)
    matrix = confusion_matrix(test.labels.numpy(), predicted.numpy(), len(test.classes))
    tensorboard.log_confusion(writer, "test/confusion_matrix", matrix, test.classes)
    tensorboard.log_reliability(writer, "test/reliability_diagram", frame, metrics["ece"])
    probs = logits.softmax(1)
    for c, name in enumerate(test.classes):  # one-vs-rest precision-recall curves
        writer.add_pr_curve(f"pr_curve/{name}", (test.labels == c).numpy(), probs[:, c].numpy(), 0)
    wrong = (predicted != test.labels).nonzero().flatten()
    worst = wrong[probs[wrong].max(1).values.argsort(descending=True)][:misclassified]
    if len(worst):
        tensorboard.log_predictions(writer, "test/most_confident_mistakes", test.images[worst], test.labels[worst],
                           predicted[worst], test.classes, 0)

