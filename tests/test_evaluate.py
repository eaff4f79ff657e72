"""Evaluation metrics against hand-computed values, calibration, and flip TTA."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from tensorboardX import SummaryWriter
from torch import nn

from fixtures import MEAN, STD
from reprotune.config import EvaluateConfig
from reprotune.data.splits import Split
from reprotune.evaluation.report import (
    classification_metrics,
    confusion_rows,
    evaluate_model,
    reliability,
    top_k_accuracy,
    tta_logits,
)
from reprotune.tracking import tensorboard
from reprotune.training.scoring import batched_logits, loss_and_accuracy

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


def test_f1_is_computed_whenever_precision_or_recall_is_nonzero():
    # Each class half right (precision 1/2, recall 1/2: their sum is 1, F1 is 1/2), not a 0 by the zero guard.
    logits = torch.tensor([[5.0, 0], [0, 5.0], [5.0, 0], [0, 5.0]])
    m = classification_metrics(logits, torch.tensor([0, 0, 1, 1]), ["a", "b"])
    assert m["class_f1"] == pytest.approx({"a": 0.5, "b": 0.5})


def test_predict_under_autocast_runs_the_model_in_that_dtype():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            out = self.linear(x.mean((2, 3)))
            seen.append(out.dtype)
            return out

    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    plain = batched_logits(Probe(), images, 2)
    mixed = batched_logits(Probe(), images, 2, autocast=torch.bfloat16)
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2
    assert mixed.dtype == torch.float32 and mixed.shape == plain.shape  # logits come back as float32


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


def test_evaluate_with_tta_reports_its_keys_from_the_mirrored_logits(tmp_path):
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    test = Split(images, torch.tensor([0, 1, 0, 1, 1, 0]), ["left", "right"], MEAN, STD)
    model = _Halves()
    with SummaryWriter(str(tmp_path)) as writer:
        result = evaluate_model(model, test, EvaluateConfig(tta=True, misclassified_images=2), writer)
    plain = classification_metrics(model(images.float() / 255).detach(), test.labels, test.classes)
    tta = classification_metrics(tta_logits(model, images, 4), test.labels, test.classes)
    assert set(result.metrics["tta"]) == {"test_acc", "test_loss", "macro_f1", "acc_gain"}
    assert result.metrics["test_acc"] == plain["test_acc"]
    assert result.metrics["tta"]["test_acc"] == tta["test_acc"]
    assert result.metrics["tta"]["test_loss"] == pytest.approx(tta["test_loss"])
    assert result.metrics["tta"]["macro_f1"] == pytest.approx(tta["macro_f1"])
    assert result.metrics["tta"]["acc_gain"] == pytest.approx(tta["test_acc"] - plain["test_acc"])
    assert list(result.per_class.columns) == ["class", "precision", "recall", "f1", "support"]
    assert result.per_class.support.tolist() == [3, 3] and "class_f1" not in result.metrics
    without = evaluate_model(model, test, EvaluateConfig(tta=False), SummaryWriter(str(tmp_path / "b")))
    assert "tta" not in without.metrics


def test_accuracy_counts_the_right_ones():
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    loss, acc = loss_and_accuracy(logits, labels)
    assert acc == 0.8 and loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


def test_classes_never_present_or_never_predicted_get_zeros_not_garbage():
    # Five classes: "d" never occurs, "e" is never predicted, "c" neither predicted nor right.
    classes = ["a", "b", "c", "d", "e"]
    logits = torch.tensor([[5.0, 0, 0, 0, 0], [0, 5.0, 0, 0, 0], [0, 5.0, 0, 0, 0], [0, 0, 0, 5.0, 0],
                           [5.0, 0, 0, 0, 0]])
    labels = torch.tensor([0, 1, 2, 4, 4])
    m = classification_metrics(logits, labels, classes)
    assert m["class_acc"] == {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0, "e": 0.0}
    assert m["class_precision"] == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0, "d": 0.0, "e": 0.0})
    assert m["class_f1"] == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 0.0, "d": 0.0, "e": 0.0})
    assert m["class_support"] == {"a": 1, "b": 1, "c": 1, "d": 0, "e": 2}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 5)


def test_top5_is_top_five_not_six():
    logits = torch.arange(10, dtype=torch.float32).flip(0).repeat(2, 1)  # class 0 highest ... 9 lowest
    labels = torch.tensor([4, 5])  # 5th and 6th by score
    assert top_k_accuracy(logits, labels, 5) == 0.5
    assert classification_metrics(logits, labels, [str(i) for i in range(10)])["test_top5_acc"] == 0.5


def test_reliability_bins_average_their_images():
    # Two images in the 0.9 bin (one right), one in the 0.6 bin (right); 10 bins.
    probs = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.55, 0.45]])
    labels = torch.tensor([0, 0, 0])
    frame, ece = reliability(probs, labels, bins=10)
    assert frame["bin_upper"].tolist() == pytest.approx([0.1 * k for k in range(1, 11)])
    assert frame["count"].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert frame["confidence"][9] == pytest.approx(0.95) and frame["accuracy"][9] == 0.5
    assert frame["confidence"][5] == pytest.approx(0.55) and frame["accuracy"][5] == 1.0
    assert ece == pytest.approx((2 * 0.45 + 0.45) / 3)
    # With more classes than bins a confidence can fall below the first bin's top: it lands in bin 1.
    many = torch.full((1, 20), 0.05)
    low, _ = reliability(many, torch.tensor([0]), bins=10)
    assert low["count"].tolist()[0] == 1


def test_confusion_rows_name_the_classes():
    rows = confusion_rows(LOGITS, LABELS, CLASSES)
    assert list(rows.columns) == ["actual", "predicted"]
    assert rows.values.tolist() == [["a", "a"], ["b", "b"], ["c", "b"], ["a", "c"]]


def test_evaluate_model_returns_every_table_it_promises(tmp_path):
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    test = Split(images, torch.tensor([0, 1] * 4), ["left", "right"], MEAN, STD)
    with SummaryWriter(str(tmp_path)) as writer:
        result = evaluate_model(_Halves(), test, EvaluateConfig(calibration_bins=4, misclassified_images=1), writer)
    logits = _Halves()(images.float() / 255).detach()
    frame, ece = reliability(logits.softmax(1), test.labels, 4)
    assert result.metrics["ece"] == pytest.approx(ece) and len(result.reliability) == 4
    assert result.reliability["count"].tolist() == frame["count"].tolist()
    assert result.confusion.values.tolist() == confusion_rows(logits, test.labels, test.classes).values.tolist()
    assert result.per_class["recall"].tolist() == list(result.metrics["class_acc"].values())


class _Lookup(nn.Module):
    """Logits chosen per image: image i carries i in its first pixel, the model returns row i of a table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, x):
        return self.table[(x[:, 0, 0, 0] * 255).round().long()]


def test_tensorboard_shows_what_evaluate_reports(tmp_path, monkeypatch):
    # Seven images, three classes, with spread confidences: three mistakes, the surest first.
    table = torch.tensor([[4.0, 0, 0], [0, 1.5, 0], [0, 0, 0.5], [0, 6.0, 0], [1.9, 0, 0.2], [0, 0, 2.0],
                          [0.3, 0, 0]])
    labels = torch.tensor([0, 1, 2, 0, 2, 2, 1])  # wrong: image 3 (p .99), image 4 (p .75), image 6 (p .40)
    images = torch.zeros(7, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(7, dtype=torch.uint8)
    test = Split(images, labels, CLASSES, MEAN, STD)
    drawn = {}
    for name in ("log_predictions", "log_confusion", "log_reliability"):
        real = getattr(tensorboard, name)
        monkeypatch.setattr(tensorboard, name,
                            lambda *a, _real=real, _name=name: (drawn.__setitem__(_name, a), _real(*a)))
    with SummaryWriter(str(tmp_path)) as writer:
        result = evaluate_model(_Lookup(table), test, EvaluateConfig(tta=True, calibration_bins=5,
                                                                     misclassified_images=2), writer)
    expected = classification_metrics(table, labels, CLASSES, bins=5)
    assert result.metrics["ece"] == pytest.approx(expected["ece"]) != classification_metrics(table, labels,
                                                                                             CLASSES)["ece"]
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    assert {events.Scalars(tag)[0].step for tag in events.Tags()["scalars"]} == {0}
    logged = {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]}
    assert logged == pytest.approx({"test/loss": expected["test_loss"], "test/acc": expected["test_acc"],
                                    "test/top5_acc": 1.0, "test/macro_f1": expected["macro_f1"],
                                    "test/ece": expected["ece"], "test/tta_acc": result.metrics["tta"]["test_acc"],
                                    **{f"test_class_f1/{c}": expected["class_f1"][c] for c in CLASSES}}, rel=1e-6)
    assert {"test/confusion_matrix", "test/reliability_diagram", "test/most_confident_mistakes"} <= set(
        events.Tags()["images"])
    for c, name in enumerate(CLASSES):  # one-vs-rest: at the lowest threshold every image of the class is a hit
        assert events.Tensors(f"pr_curve/{name}")[0].step == 0
        curve = tensor_util.make_ndarray(events.Tensors(f"pr_curve/{name}")[0].tensor_proto)
        assert curve[0, 0] == (labels == c).sum() and curve[1, 0] == (labels != c).sum()
    _, _, mistakes, actual, predicted, classes, _ = drawn["log_predictions"]
    assert actual.tolist() == [0, 2] and predicted.tolist() == [1, 0] and classes == CLASSES  # images 3 then 4
    assert mistakes[:, 0, 0, 0].tolist() == [3, 4]
    assert drawn["log_confusion"][2].tolist() == [[1, 1, 0], [1, 1, 0], [1, 0, 2]]
    assert len(drawn["log_reliability"][2]) == 5 and drawn["log_reliability"][3] == expected["ece"]
