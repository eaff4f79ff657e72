"""ExecuTorch export (export.executorch): the real stage on the pipeline's trained model, read back
through ExecuTorch's own Python runtime, and the gates (tolerance, int8 agreement) on a small model."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from torch import nn

from fixtures import MEAN, STD, events, run
from reprotune.config import ExportConfig
from reprotune.data.splits import Split, load_split, to_float
from reprotune.errors import ReprotuneError
from reprotune.export import phone, release
from reprotune.export.release import ExportPaths, export_all
from reprotune.inference.predict import load_predictor
from reprotune.inference.runtime import executorch_runner
from reprotune.training.model import Classifier, load_model

MAX_BATCH = 24  # above 15: a batch axis narrowed by the CPU convolution heuristics (see mobile.py) fails


@pytest.fixture(scope="module")
def project(exported):
    """The tiny pipeline after a real `dvc repro` with export.executorch on (conftest's `exported`,
    shared with the compress tests): the project and what that run wrote on stderr."""
    root, proc = exported
    assert json.loads((root / "models/model_card.json").read_text())["executorch"]["batch"]["max"] == MAX_BATCH
    return root, proc.stderr


def _forward(root, name: str):
    """The .pte's forward method, loaded by ExecuTorch's runtime exactly as an app would."""
    from executorch.runtime import Runtime

    return Runtime.get().load_program(root / "models/executorch" / name).load_method("forward")


def test_the_stage_writes_both_programs_and_their_metrics(project):
    project, stderr = project
    assert "cpuinfo" not in stderr  # no runtime chatter
    assert "executorch" not in stderr.lower()  # and no warning: the int8 program passed its gate
    folder = project / "models/executorch"
    assert sorted(p.name for p in folder.iterdir()) == ["model.int8.pte", "model.pte"]
    # Lowered to XNNPACK: the delegate's id is in the program (without the partitioner it is not).
    assert b"XnnpackBackend" in (folder / "model.pte").read_bytes()
    export = json.loads((project / "metrics/export.json").read_text())
    evaluate = json.loads((project / "metrics/evaluate.json").read_text())
    fp32, int8 = export["executorch"], export["executorch_int8"]
    assert set(fp32) == {"max_abs_diff", "test_acc", "agreement", "latency_ms"}
    assert fp32["max_abs_diff"] < 1e-3 and export["parity"] >= fp32["max_abs_diff"]
    assert fp32["test_acc"] == pytest.approx(evaluate["test_acc"]) and fp32["agreement"] == 1.0
    assert int8["shipped"] is True and int8["agreement"] >= 0.5 and int8["size_ratio"] < 0.3
    assert fp32["latency_ms"] > 0 and int8["latency_ms"] > 0
    card = json.loads((project / "models/model_card.json").read_text())
    assert card["files"]["executorch"] == "executorch/model.pte"
    assert card["files"]["executorch_int8"] == "executorch/model.int8.pte"
    assert card["bytes"]["executorch"] == (folder / "model.pte").stat().st_size
    assert card["executorch"]["batch"] == {"min": 1, "max": MAX_BATCH}
    assert card["metrics"]["executorch_int8_test_acc"] == int8["test_acc"]
    scalars = set(events(project / "runs/export").Tags()["scalars"])
    assert {"export/executorch_max_abs_diff", "export/executorch_int8_agreement"} <= scalars


def test_the_program_matches_pytorch_at_batch_1_and_at_its_largest_batch(project):
    project, _ = project
    model, _ = load_model(project / "models/model.pt")
    test = load_split(project / "data/processed/test.pt")
    forward = _forward(project, "model.pte")
    assert tuple(forward.metadata.input_tensor_meta(0).sizes()) == (MAX_BATCH, 3, 32, 32)
    for batch in (1, 5, MAX_BATCH):
        images = to_float(test.images[:batch])
        (logits,) = forward.execute([images])
        with torch.no_grad():
            torch.testing.assert_close(logits, model(images), atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError):  # memory is planned for MAX_BATCH: a larger batch is refused
        forward.execute([to_float(test.images[:MAX_BATCH + 1])])


def test_test_accuracy_recomputed_through_the_runtime_is_the_metric(project):
    project, _ = project
    test = load_split(project / "data/processed/test.pt")
    export = json.loads((project / "metrics/export.json").read_text())
    for name, key in (("model.pte", "executorch"), ("model.int8.pte", "executorch_int8")):
        forward = _forward(project, name)
        images = to_float(test.images.load())
        predicted = torch.cat([forward.execute([images[i:i + MAX_BATCH]])[0] for i in range(0, len(images), MAX_BATCH)])
        assert export[key]["test_acc"] == pytest.approx((predicted.argmax(1) == test.labels).double().mean().item())


def test_reprotune_predict_runs_both_programs_through_the_runtime(project):
    project, _ = project
    images = to_float(load_split(project / "data/processed/test.pt").images[:40]).numpy()  # over one call's 24
    onnx = load_predictor(project / "models/model.onnx").run(images)
    fp32 = load_predictor(project / "models/executorch/model.pte")
    assert fp32.classes == load_predictor(project / "models/model.onnx").classes and fp32.size == 32
    np.testing.assert_allclose(fp32.run(images), onnx, atol=1e-3)
    int8 = load_predictor(project / "models/executorch/model.int8.pte").run(images)
    assert int8.shape == onnx.shape and (int8.argmax(1) == onnx.argmax(1)).mean() >= 0.5


def test_predict_on_a_program_loads_the_runtime_without_the_compiler(project, tmp_path):
    # ExecuTorch's runtime bindings import its whole compiler (torch._dynamo, torchao: 4.5 s of a 7 s
    # start on 2 cores, and torchao's deprecation notice on stderr) unless the runtime keeps it out.
    project, _ = project
    from PIL import Image

    Image.fromarray(load_split(project / "data/processed/test.pt").images[0].permute(1, 2, 0).numpy()).save(
        tmp_path / "image.png")
    proc = run(["reprotune", "predict", str(tmp_path / "image.png"), "--model", "models/executorch/model.pte",
                "--text"], project)
    assert proc.stderr == "" and proc.stdout.startswith(f"{tmp_path / 'image.png'}: "), proc
    probe = ("import sys; from pathlib import Path; from reprotune.inference.predict import load_predictor; "
             "load_predictor(Path('models/executorch/model.pte')); "
             "print(sorted(m for m in ('executorch.exir', 'torch._dynamo', 'torchao') if m in sys.modules)); "
             "import executorch.exir; print(callable(executorch.exir.to_edge))")
    assert run([sys.executable, "-c", probe], project).stdout.split() == ["[]", "True"]


# A small classifier with the real contract (normalization inside, [0, 1] NCHW input): lowering it
# takes about a second, where ResNet18 takes about ten.
def _small() -> tuple[Classifier, Split]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4))
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return Classifier(net, MEAN, STD, 16).eval(), Split(images, torch.arange(24) % 4, list("abcd"), MEAN, STD)


def _paths(root) -> ExportPaths:
    return ExportPaths(onnx=root / "model.onnx", int8=root / "int8", torchscript=root / "model.torchscript.pt",
                       compressed=root / "compressed", executorch=root / "executorch")


def _config(**overrides) -> ExportConfig:
    return ExportConfig.model_validate({"check_images": 8, "calibration_images": 16, "latency_runs": 2,
                                        "executorch": True, "executorch_max_batch": 4, **overrides})


def _int8_is_a_copy_of_fp32(monkeypatch) -> None:
    """Skip PT2E (seconds even for a small model; the stage test above runs it): the int8 program is the
    fp32 one, which the gate tests then make disagree through its runner."""
    monkeypatch.setattr(phone, "quantize_pte", lambda model, example, path, calibration, max_batch:
                        shutil.copy(path.with_name(phone.PTE_FILE), path))


def _wrong(monkeypatch, program: str, change) -> None:
    """Make the runner of `program` (a .pte file name) return changed logits, the others untouched."""
    real = executorch_runner

    def runner(path):
        run_ = real(path)
        return (lambda images: change(run_(images))) if path.name == program else run_
    monkeypatch.setattr(release, "executorch_runner", runner)


@pytest.mark.reliability
def test_a_program_outside_the_tolerance_is_one_line_and_nothing_is_written(tmp_path, monkeypatch):
    model, split = _small()
    _wrong(monkeypatch, phone.PTE_FILE, lambda logits: logits + 1e-2)
    with pytest.raises(ReprotuneError) as error:
        export_all(model, split, split.images, _config(tolerance=1e-3), _paths(tmp_path))
    assert str(error.value).startswith("executorch export differs from PyTorch by 0.01 (> export.tolerance 0.001)")
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # not the ONNX files either, nor a temporary


@pytest.mark.reliability
@pytest.mark.parametrize("int8", ["optional", "required"])
def test_an_int8_program_below_its_gate_is_left_out_or_fails(tmp_path, monkeypatch, int8):
    model, split = _small()
    _int8_is_a_copy_of_fp32(monkeypatch)
    _wrong(monkeypatch, phone.PTE_INT8_FILE, lambda logits: np.roll(logits, 1, axis=1))  # another class each time
    if int8 == "required":
        with pytest.raises(ReprotuneError, match=r"int8 ExecuTorch model agrees with PyTorch on 0\.000 .*; "
                                                 "export.int8 is required, so nothing was written"):
            export_all(model, split, split.images, _config(int8=int8), _paths(tmp_path))
        assert list(tmp_path.iterdir()) == []
        return
    report = export_all(model, split, split.images, _config(int8=int8, int8_min_agreement=0.5), _paths(tmp_path))
    folder = tmp_path / "executorch"
    assert sorted(p.name for p in folder.iterdir()) == ["model.pte", "rejected.json"]
    assert report["executorch_int8"]["shipped"] is False and report["executorch_int8"]["agreement"] == 0.0
    assert json.loads((folder / "rejected.json").read_text())["agreement"] == 0.0
    assert f"not shipped ({folder / 'rejected.json'} says why)" in report["warning"]


def test_off_writes_only_a_note_and_on_without_executorch_installed_says_how_to_install(tmp_path, monkeypatch):
    model, split = _small()
    report = export_all(model, split, split.images, _config(executorch=False), _paths(tmp_path))
    assert "executorch" not in report
    assert [p.name for p in (tmp_path / "executorch").iterdir()] == ["disabled.txt"]
    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # an import of it now fails, as when not installed
    on = tmp_path / "on"
    on.mkdir()
    with pytest.raises(ReprotuneError) as error:
        export_all(model, split, split.images, _config(), _paths(on))
    assert list(on.iterdir()) == []  # the ONNX files are not written either
    assert str(error.value) == ("export.executorch is true but ExecuTorch is not installed (executorch.exir is "
                                "missing): pip install -c constraints.txt -e '.[mobile]'")
