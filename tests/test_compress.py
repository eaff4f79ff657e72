"""The compress stage: structured pruning, distillation, recovery through finetune's loop, the outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from reprotune import data, train
from reprotune.checkpoint import Checkpoints
from reprotune.compress import ROUND_TO, compress, prune
from reprotune.config import CompressConfig, ModelConfig, Params
from reprotune.evaluate import predict
from reprotune.model import build_model, load_model, save_model
from reprotune.runtime import onnx_runner
from reprotune.train import distillation

MEAN, STD = [0.5] * 3, [0.25] * 3


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(300) % 10)
    images = data.synthetic_images(labels, rng).reshape(-1, 3, 32, 32)
    raw = data.RawData(images, labels, images[:60], labels[:60], data.SYNTHETIC_CLASSES)
    return data.make_splits(raw, 0.2, seed=0)


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(weights="none"), 10, MEAN, STD).eval()


def _convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_pruning_removes_whole_channels_and_keeps_a_working_classifier():
    model, x = _model(), torch.rand(4, 3, 32, 32)
    light, heavy = (prune(model, CompressConfig(ratio=r), x[:2]) for r in (0.2, 0.5))
    sizes = [sum(p.numel() for p in m.parameters()) for m in (model, light, heavy)]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[2] < 0.5 * sizes[0]  # channels go in pairs (a conv's outputs, the next one's inputs)
    for pruned in (light, heavy):
        assert pruned(x).shape == (4, 10)  # the head keeps every class
        widths = [conv.out_channels for conv in _convs(pruned)]
        assert all(w % ROUND_TO == 0 for w in widths), widths  # dense-kernel friendly widths
        assert sum(widths) < sum(conv.out_channels for conv in _convs(model))
    # The original is untouched: pruning works on a copy.
    assert [c.out_channels for c in _convs(model)][:2] == [64, 64]


def test_magnitude_pruning_removes_the_quietest_channels_first():
    """Channels of the first conv's group (conv1, bn1 and the layer1 blocks' outputs, coupled by the
    residual adds) made 1000x smaller than the rest go first under magnitude; the random control keeps
    some of them."""
    model = _model()
    quiet = [3, 17, 40, 58]
    group = ("net.conv1.", "net.bn1.", "net.layer1.0.conv2.", "net.layer1.0.bn2.", "net.layer1.1.conv2.",
             "net.layer1.1.bn2.")
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.startswith(group):
                tensor[quiet] *= 1e-3

    def survivors(importance: str) -> set[int]:
        pruned = prune(model, CompressConfig(ratio=0.2, importance=importance), torch.rand(2, 3, 32, 32))
        originals = model.net.conv1.weight.flatten(1)
        return {int((originals - row).abs().sum(1).argmin()) for row in pruned.net.conv1.weight.flatten(1)}

    kept = survivors("magnitude")
    assert 8 <= len(kept) < 64 and not kept & set(quiet)
    assert survivors("random") & set(quiet)


def test_a_pruned_model_is_saved_and_loaded_like_any_other(tmp_path):
    model = prune(_model(), CompressConfig(ratio=0.3), torch.rand(2, 3, 32, 32))
    path = tmp_path / "model.compressed.pt"
    save_model(path, model, ModelConfig(weights="none"), data.SYNTHETIC_CLASSES,
               {"input_size": 32, "compression": {"ratio": 0.3}})
    loaded, saved = load_model(path)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [c.out_channels for c in _convs(loaded)] == [c.out_channels for c in _convs(model)]
    assert saved["compression"]["ratio"] == 0.3


def test_distillation_loss_is_the_weighted_sum_of_cross_entropy_and_tempered_kl():
    torch.manual_seed(0)
    teacher, x, y = nn.Linear(5, 4), torch.randn(8, 5), torch.randint(0, 4, (8,))
    student = torch.randn(8, 4)
    with torch.no_grad():
        target = teacher(x)
    ce = F.cross_entropy(student, y)
    kl = (F.softmax(target / 3, 1) * (F.log_softmax(target / 3, 1) - F.log_softmax(student / 3, 1))).sum(1).mean()
    assert distillation(teacher, 0.0, 3.0, 0.0)(student, x, y) == pytest.approx(ce.item(), rel=1e-5)
    assert distillation(teacher, 0.25, 3.0, 0.0)(student, x, y) == pytest.approx(
        (0.75 * ce + 0.25 * 9 * kl).item(), rel=1e-5)
    # A student that already says what the teacher says has nothing to learn from it.
    assert distillation(teacher, 1.0, 3.0, 0.0)(target, x, y).item() == pytest.approx(0.0, abs=1e-6)


def test_compress_prunes_recovers_through_finetune_and_measures_both(splits, tmp_path, monkeypatch):
    params = Params.model_validate({
        "model": {"weights": "none"}, "log": {"graph": False, "images": 0, "histograms": False},
        "train": {"batch_size": 32, "device": "cpu"},
        "compress": {"ratio": 0.3, "epochs": 1, "lr": 0.02, "distill": 0.5}})
    model = _model()
    taught = []  # (teacher's first weight, the batch's size) per training step's loss

    def spy(teacher, weight, temperature, smoothing):
        loss = distillation(teacher, weight, temperature, smoothing)
        assert (weight, temperature) == (0.5, 4.0)
        return lambda logits, images, labels: taught.append((teacher.net.conv1.weight, len(images))) \
            or loss(logits, images, labels)

    monkeypatch.setattr(train, "distillation", spy)
    checkpoints = Checkpoints(tmp_path / "work", "key")
    pruned, metrics = compress(params, model, splits["train"], splits["val"], splits["test"], checkpoints)
    # Distillation from the unpruned model drove every training step.
    steps = len(splits["train"].labels) // 32
    assert len(taught) == steps and all(torch.equal(w, model.net.conv1.weight) and n == 32 for w, n in taught)
    assert metrics["recovery"]["epochs"] == 1
    assert metrics["flops_ratio"] == pytest.approx(metrics["after"]["flops"] / metrics["before"]["flops"])
    assert 0.2 < metrics["flops_ratio"] < 0.7
    assert metrics["after"]["parameters"] == sum(p.numel() for p in pruned.parameters())
    assert metrics["after"]["size_mb"] < 0.75 * metrics["before"]["size_mb"]
    test = splits["test"]
    assert metrics["test_acc"] == pytest.approx((predict(pruned, test.images, 64).argmax(1) == test.labels)
                                                .float().mean().item())
    assert metrics["acc_change"] == pytest.approx(metrics["test_acc"] - metrics["before"]["test_acc"])
    # The recovery fine-tune trained the pruned weights, through finetune's loop and its logs.
    untrained = prune(model, params.compress, torch.rand(2, 3, 32, 32))
    pairs = zip(untrained.state_dict().values(), pruned.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    scalars = EventAccumulator(str(checkpoints.logdir)).Reload().Tags()["scalars"]
    assert {"train/loss", "val/acc"} <= set(scalars)


def test_the_default_ratio_copies_the_model_and_a_real_one_compresses_through_dvc(pipeline, exported):
    """The pipeline fixture ran compress at ratio 0 (a byte copy); `exported` ran it at 0.3 through
    `dvc repro`, and export shipped the compressed model too."""
    assert (pipeline / "models/model.compressed.pt").read_bytes() == (pipeline / "models/model.pt").read_bytes()
    assert json.loads((pipeline / "metrics/compress.json").read_text()) == {"ratio": 0.0}
    root, proc = exported
    out = proc.stdout
    assert "Running stage 'compress'" in out and "Running stage 'finetune'" not in out
    metrics = json.loads((root / "metrics/compress.json").read_text())
    assert metrics["flops_ratio"] < 0.7 and metrics["recovery"]["epochs"] == 1
    model, saved = load_model(root / "models/model.compressed.pt")
    assert sum(p.numel() for p in model.parameters()) == metrics["after"]["parameters"]
    scalars = EventAccumulator(str(root / "runs/compress")).Reload().Tags()["scalars"]
    assert {"train/loss", "val/acc", "compress/flops_ratio", "compress/speedup"} <= set(scalars)
    card = json.loads((root / "models/model_card.json").read_text())
    assert card["files"]["compressed_onnx"] == "compressed/model.onnx"
    exported = json.loads((root / "metrics/export.json").read_text())["compressed"]
    assert exported["max_abs_diff"] <= 1e-3
    images = data.load_split(root / "data/processed/test.pt")
    logits = onnx_runner(root / "models/compressed/model.onnx")(data.to_float(images.images[:8]).numpy())
    with torch.no_grad():
        assert np.abs(logits - model(data.to_float(images.images[:8])).numpy()).max() < 1e-3
