"""Evaluation metrics against hand-computed values, calibration, and flip TTA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reprotune.evaluate import classification_metrics, reliability, top_k_accuracy, tta_logits

CLASSES = ["a", "b", "c"]
# Four images, three classes: two right (0 and 1), image 2 (a "c") called "b", image 3 (an "a") called "c".
LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 2.0, 0.0], [0.5, 0.0, 5.0]])
LABELS = torch.tensor([0, 1, 2, 0])


def test_metrics_match_hand_computed_values():
    m = classification_metrics(LOGITS, LABELS, CLASSES)
    assert m["test_acc"] == 0.5
    # confusion rows (actual) a: [1, 0, 1], b: [0, 1, 0], c: [0, 1, 0]
    assert m["class_acc"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.0})  # recall
    assert m["class_precision"] == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.0})
    assert m["class_f1"] == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 0.0})
    assert m["macro_f1"] == pytest.approx(4 / 9)
    assert m["test_loss"] == pytest.approx(torch.nn.functional.cross_entropy(LOGITS, LABELS).item())
    assert m["test_top5_acc"] == 1.0  # three classes: top-5 holds them all
    assert top_k_accuracy(LOGITS, LABELS, 2) == 0.75  # image 2's "c" is its lowest logit


def test_expected_calibration_error_and_reliability_bins():
    probs = torch.tensor([[0.92, 0.04, 0.04], [0.16, 0.74, 0.10], [0.27, 0.63, 0.10], [0.10, 0.05, 0.85]])
    frame, ece = reliability(probs, LABELS, bins=10)
    # One image per bin: ECE = mean |correct - confidence| = (0.08 + 0.26 + 0.63 + 0.85) / 4
    assert ece == pytest.approx(0.455)
    assert frame["count"].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert frame["accuracy"].tolist()[6:] == [0.0, 1.0, 0.0, 1.0]
    assert frame["confidence"].tolist()[6:] == pytest.approx([0.63, 0.74, 0.85, 0.92])
    assert frame["confidence"].isna().sum() == 6


class _Halves(nn.Module):
    """Logits = (mean of the left half, mean of the right half): changes under a mirror."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.stack([x[..., :16].mean((1, 2, 3)), x[..., 16:].mean((1, 2, 3))], dim=1)


def test_tta_changes_predictions_only_through_flipping():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    model = _Halves()
    plain = model(images.float() / 255)
    mirrored = model(images.flip(3).float() / 255)
    torch.testing.assert_close(tta_logits(model, images, batch_size=2), (plain + mirrored) / 2)
    symmetric = torch.cat([images[..., :16], images[..., :16].flip(3)], dim=3)  # equal to its mirror
    torch.testing.assert_close(tta_logits(model, symmetric, batch_size=2), model(symmetric.float() / 255))
