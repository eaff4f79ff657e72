"""The compress stage: structured pruning, distillation, recovery through finetune's loop, the outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from fixtures import MEAN, REPO, STD, run, synthetic_splits
from reprotune.config import CompressConfig, ExportConfig, ModelConfig, Params
from reprotune.data.splits import Split, load_split, save_split, to_float
from reprotune.data.synthetic import SYNTHETIC_CLASSES
from reprotune.errors import ReprotuneError
from reprotune.export.card import model_card
from reprotune.export.compress import ROUND_TO, compress, gate, prune, recovery_epochs, recovery_key, recovery_params
from reprotune.export.release import ExportPaths, export_all, export_metrics
from reprotune.inference.runtime import onnx_runner
from reprotune.training import loop
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.loop import distillation
from reprotune.training.model import build_model, load_model, save_model
from reprotune.training.scoring import batched_logits


@pytest.fixture(scope="module")
def splits():
    return synthetic_splits(300, 60, 0.2)


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
    save_model(path, model, ModelConfig(weights="none"), SYNTHETIC_CLASSES,
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
        "compress": {"ratio": 0.3, "epochs": 1, "min_steps": 0, "lr": 0.02, "distill": 0.5, "max_acc_drop": 1.0}})
    model = _model()
    taught = []  # (teacher's first weight, the batch's size) per training step's loss

    def spy(teacher, weight, temperature, smoothing):
        loss = distillation(teacher, weight, temperature, smoothing)
        assert (weight, temperature) == (0.5, 4.0)
        return lambda logits, images, labels: taught.append((teacher.net.conv1.weight, len(images))) \
            or loss(logits, images, labels)

    monkeypatch.setattr(loop, "distillation", spy)
    checkpoints = Checkpoints(tmp_path / "work", "key")
    pruned, metrics, verdict = compress(params, model, splits["train"], splits["val"], splits["test"], checkpoints)
    assert verdict is None and metrics["accepted"] is True  # any drop is within max_acc_drop 1.0
    # Distillation from the unpruned model drove every training step.
    steps = len(splits["train"].labels) // 32
    assert len(taught) == steps and all(torch.equal(w, model.net.conv1.weight) and n == 32 for w, n in taught)
    assert metrics["recovery"]["epochs"] == 1 and metrics["recovery"]["steps"] == steps
    assert metrics["flops_ratio"] == pytest.approx(metrics["after"]["flops"] / metrics["before"]["flops"])
    assert 0.2 < metrics["flops_ratio"] < 0.7
    assert metrics["after"]["parameters"] == sum(p.numel() for p in pruned.parameters())
    assert metrics["after"]["size_mb"] < 0.75 * metrics["before"]["size_mb"]
    test = splits["test"]
    assert metrics["test_acc"] == pytest.approx((batched_logits(pruned, test.images, 64).argmax(1) == test.labels)
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
    images = load_split(root / "data/processed/test.pt")
    logits = onnx_runner(root / "models/compressed/model.onnx")(to_float(images.images[:8]).numpy())
    with torch.no_grad():
        assert np.abs(logits - model(to_float(images.images[:8])).numpy()).max() < 1e-3


# --------------------------------------------------------------------------- recovery sizing and the gate


@pytest.mark.parametrize("images, batch, epochs, min_steps, expected", [
    (1211, 64, 3, 500, 28),     # a small set (digits): 18 steps an epoch, so 28 epochs cover 500 steps
    (45_000, 128, 3, 500, 3),   # CIFAR-10's 351 steps an epoch: 3 epochs are already 1,053 steps
    (45_000, 128, 1, 500, 2),   # one epoch is 351: a second covers the rest
    (1211, 64, 3, 0, 3),        # min_steps 0: compress.epochs alone
    (1211, 64, 0, 500, 0),      # compress.epochs 0: no recovery, whatever min_steps says
    (20, 64, 3, 500, 500),      # fewer images than a batch: finetune still takes one step an epoch
])
def test_recovery_runs_at_least_min_steps_whatever_the_training_set_size(images, batch, epochs, min_steps, expected):
    cfg = CompressConfig(ratio=0.2, epochs=epochs, min_steps=min_steps)
    assert recovery_epochs(cfg, images, batch) == expected
    if expected:
        params = Params.model_validate({"train": {"batch_size": batch, "epochs": 7, "lr": 0.1},
                                        "compress": cfg.model_dump()})
        recovery = recovery_params(params, images).train
        assert (recovery.epochs, recovery.lr) == (expected, cfg.lr)


def test_the_gate_accepts_a_drop_within_max_acc_drop_and_rejects_one_past_it():
    cfg = CompressConfig(ratio=0.2, max_acc_drop=0.01)
    assert gate(0.01, cfg) is None and gate(-0.05, cfg) is None and gate(0.0, cfg) is None
    assert gate(0.0101, cfg) == ("the compressed model lost 0.0101 test accuracy to pruning "
                                 "(> compress.max_acc_drop 0.01)")
    required = cfg.model_copy(update={"gate": "required"})
    assert gate(0.01, required) is None
    with pytest.raises(ReprotuneError) as error:
        gate(0.2, required)
    assert str(error.value) == ("the compressed model lost 0.2000 test accuracy to pruning (> compress.max_acc_drop "
                                "0.01); compress.gate is required, so nothing was written")


def test_a_changed_gate_keeps_the_recovery_checkpoint_and_a_changed_recovery_does_not(tmp_path):
    """After a run the gate failed, loosening the gate resumes the finished recovery in seconds."""
    inputs = [tmp_path / "model.pt"]
    inputs[0].write_bytes(b"model")

    def key(**compress) -> str:
        return recovery_key(Params.model_validate({"compress": {"ratio": 0.2, **compress}}), inputs)

    assert key() == key(max_acc_drop=0.05) == key(gate="required")
    assert len({key(), key(lr=0.05), key(min_steps=100), key(ratio=0.3)}) == 4


def _project(root: Path, splits: dict, compress_params: dict) -> Path:
    """A stage's working directory: an untrained model, splits whose test labels are that model's own
    predictions (so it scores 1.0 and pruning it without recovery loses a lot), and params."""
    model = _model()
    (root / "models").mkdir(parents=True)
    save_model(root / "models/model.pt", model, ModelConfig(weights="none"), SYNTHETIC_CLASSES,
               {"input_size": 32, "seed": 0})
    test = splits["test"]
    test = Split(test.images, batched_logits(model, test.images, 64).argmax(1), test.classes, test.mean, test.std)
    (root / "data/processed").mkdir(parents=True)
    for name, split in {**splits, "test": test}.items():
        save_split(split, root / f"data/processed/{name}.pt")
    (root / "params.yaml").write_text(yaml.safe_dump({
        "model": {"weights": "none"}, "train": {"batch_size": 32, "device": "cpu"},
        "log": {"graph": False, "images": 0, "histograms": False},
        "compress": {"ratio": 0.5, "epochs": 0, **compress_params}}))
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_required_gate_fails_the_stage_in_one_line_and_writes_nothing(splits, tmp_path):
    root = _project(tmp_path, splits, {"gate": "required"})
    before = _tree(root)
    proc = run(["python", str(REPO / "stages/compress.py")], root, check=False)
    assert proc.returncode == 1
    assert re.fullmatch(r"reprotune: error: the compressed model lost [01]\.\d{4} test accuracy to pruning "
                        r"\(> compress\.max_acc_drop 0\.01\); compress\.gate is required, so nothing was written",
                        proc.stderr.strip()), proc.stderr
    assert _tree(root) == before


def test_an_optional_gate_writes_the_model_marked_rejected_and_export_leaves_it_out(splits, tmp_path):
    root = _project(tmp_path / "project", splits, {})
    proc = run(["python", str(REPO / "stages/compress.py")], root)
    metrics = json.loads((root / "metrics/compress.json").read_text())
    assert metrics["accepted"] is False and metrics["acc_change"] < -0.01
    verdict = (f"the compressed model lost {-metrics['acc_change']:.4f} test accuracy to pruning "
               f"(> compress.max_acc_drop 0.01)")
    assert proc.stderr.strip().splitlines() == [
        f"reprotune: warning: {verdict}: export will leave it out of models/compressed/"]
    compressed, saved = load_model(root / "models/model.compressed.pt")
    assert saved["compression"]["accepted"] is False and saved["compression"]["verdict"] == verdict

    # Export, the way stages/export.py calls it: the compressed files are left out, the verdict kept.
    model, _ = load_model(root / "models/model.pt")
    test = load_split(root / "data/processed/test.pt")
    out = tmp_path / "models"
    paths = ExportPaths(onnx=out / "model.onnx", int8=out / "int8", torchscript=out / "model.torchscript.pt",
                        compressed=out / "compressed", executorch=out / "executorch")
    cfg = ExportConfig(check_images=8, calibration_images=8, latency_runs=1, int8_min_agreement=0.0)
    report = export_all(model, test, test.images, cfg, paths, compressed, saved["compression"]["verdict"])
    assert [p.name for p in paths.compressed.iterdir()] == ["rejected.json"]
    rejected = json.loads((paths.compressed / "rejected.json").read_text())
    assert rejected["verdict"] == verdict and rejected["unpruned_test_acc"] == 1.0
    assert rejected["test_acc"] == pytest.approx(metrics["test_acc"])
    assert report["warning"] == f"{verdict}: not shipped ({paths.compressed / 'rejected.json'} says why)"
    assert "compressed" not in report and "compressed_int8" not in report
    assert export_metrics(report)["compressed_shipped"] is False
    card = model_card(saved, report, None, saved)
    assert card["files"]["compressed_onnx"] is None and card["files"]["compressed_onnx_int8"] is None
    assert card["compression"]["accepted"] is False
    assert verdict in card["models"]["compressed_onnx, compressed_onnx_int8"]
    assert (out / "model.onnx").is_file()  # the unpruned model's exports ship as ever
