"""The whole DAG through `dvc repro`, and what a user checks afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import time
import urllib.request

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import torchvision
import yaml

from fixtures import IDLE, REPO, env, events, free_port, run, set_params
from reprotune.data.splits import load_split, to_float
from reprotune.training.model import load_model

OUTPUTS = [
    "data/raw/download/cifar-10-python.tar.gz", "metrics/download.json",
    "data/processed/train.pt", "data/processed/val.pt", "data/processed/test.pt", "metrics/preprocess.json",
    "models/model.pt", "metrics/train.json", "metrics/train_history.csv", "models/model.compressed.pt",
    "metrics/compress.json", "models/compressed/not_pruned.json", "models/executorch/disabled.txt",
    "metrics/evaluate.json", "metrics/confusion.csv", "metrics/reliability.csv",
    "models/model.onnx", "models/int8/model.int8.onnx", "models/model.torchscript.pt", "models/model_card.json",
    "metrics/export.json", "models/reference.pt", "metrics/monitor.json",
]
STAGES = ["download", "preprocess", "finetune", "evaluate", "compress", "export", "monitor"]


def test_every_output_exists_and_nothing_temporary_is_left(pipeline):
    for path in OUTPUTS:
        assert (pipeline / path).is_file(), path
    for stage in STAGES:
        if stage in IDLE:  # nothing to show: a note says why, and no torch was loaded to write it
            assert [p.name for p in (pipeline / "runs" / stage).iterdir()] == ["README.txt"], stage
        else:
            assert list((pipeline / "runs" / stage).glob("events.out.tfevents.*")), stage
    leftovers = [p for p in pipeline.rglob(".*.tmp") if ".git" not in p.parts and ".dvc" not in p.parts]
    assert leftovers == []


def test_dvc_sees_the_pipeline_up_to_date(pipeline):
    status = run(["dvc", "status", "--json"], pipeline).stdout
    assert json.loads(status) == {}
    assert "Stage 'download' didn't change" in run(["dvc", "repro"], pipeline).stdout


def test_metrics_contract(pipeline):
    train = json.loads((pipeline / "metrics/train.json").read_text())
    for key in ("best_val_acc", "final_val_acc", "final_val_loss", "final_train_loss", "epochs",
                "train_seconds", "images_per_second"):
        assert isinstance(train[key], (int, float)), key
    assert list(train)[:2] == ["best_val_acc", "images_per_second"]  # the headline first
    assert train["epochs"] == 2 and 0 <= train["best_val_acc"] <= 1

    evaluate = json.loads((pipeline / "metrics/evaluate.json").read_text())
    assert list(evaluate)[:2] == ["test_acc", "macro_f1"]
    # Against an independent computation: the saved model on the test split, scored by hand here.
    model, _ = load_model(pipeline / "models/model.pt")
    test = load_split(pipeline / "data/processed/test.pt")
    with torch.no_grad():
        logits = model(to_float(test.images.load()))  # the cache read whole: a test's small split
    predicted, actual = logits.argmax(1), test.labels
    assert evaluate["test_acc"] == pytest.approx((predicted == actual).double().mean().item(), abs=1e-9)
    assert evaluate["test_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, actual).item(), rel=1e-5)
    f1s = []
    for c, name in enumerate(test.classes):
        tp = ((predicted == c) & (actual == c)).sum().item()
        precision = tp / max(1, (predicted == c).sum().item())
        recall = tp / (actual == c).sum().item()
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
        assert evaluate["class_acc"][name] == pytest.approx(recall)
    assert evaluate["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
    val = load_split(pipeline / "data/processed/val.pt")
    with torch.no_grad():
        model_acc = (model(to_float(val.images.load())).argmax(1) == val.labels).double().mean().item()
    assert train["best_val_acc"] == pytest.approx(model_acc)  # the saved weights are the best epoch's
    assert 0 <= evaluate["test_acc"] <= evaluate["test_top5_acc"] <= 1
    assert evaluate["test_loss"] > 0 and 0 <= evaluate["macro_f1"] <= 1 and 0 <= evaluate["ece"] <= 1
    assert len(evaluate["class_acc"]) == 10
    per_class = pd.read_csv(pipeline / "metrics/classes.csv")
    assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support"]
    assert per_class.support.sum() == 200 and per_class.f1.mean() == pytest.approx(evaluate["macro_f1"])
    reliability = pd.read_csv(pipeline / "metrics/reliability.csv")
    assert reliability["count"].sum() == 200

    confusion = pd.read_csv(pipeline / "metrics/confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 200
    assert (confusion.actual == confusion.predicted).mean() == pytest.approx(evaluate["test_acc"])

    history = pd.read_csv(pipeline / "metrics/train_history.csv")
    assert list(history.epoch) == [1, 2]
    assert history.val_acc.max() == pytest.approx(train["best_val_acc"])

    export = json.loads((pipeline / "metrics/export.json").read_text())
    for fmt in ("onnx", "torchscript"):
        assert export[fmt]["max_abs_diff"] < 1e-3
        assert export[fmt]["test_acc"] == pytest.approx(evaluate["test_acc"])  # recomputed through the file
    int8 = export["onnx_int8"]
    assert int8["shipped"] is True and int8["size_ratio"] < 0.3 and int8["agreement"] >= 0.5


def test_declared_metrics_are_numbers_about_the_model(pipeline):
    # What `dvc exp show` and `dvc metrics diff` compare: no strings, no byte counts, no provenance.
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], pipeline).stdout)
    (workspace,) = shown.values() if isinstance(shown, dict) and "data" not in shown else (shown,)
    files = workspace["data"] if "data" in workspace else workspace
    assert set(files) == {"metrics/train.json", "metrics/evaluate.json", "metrics/compress.json", "metrics/export.json"}

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for path, content in files.items():
        for key, value in leaves(content["data"]):
            assert isinstance(value, (int, float)) and "bytes" not in key and "md5" not in key, (path, key)
    card = json.loads((pipeline / "models/model_card.json").read_text())
    assert card["bytes"]["onnx"] > 1_000_000 and card["verification"]["opset"] == 18  # provenance lives here
    assert json.loads((pipeline / "metrics/download.json").read_text())["md5"]  # and here


def test_processed_splits_are_uint8_with_train_statistics(pipeline):
    train = load_split(pipeline / "data/processed/train.pt")
    val = load_split(pipeline / "data/processed/val.pt")
    test = load_split(pipeline / "data/processed/test.pt")
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    # 64 images per class, round(0.1 * 64) = 6 of each held out: a stratified split
    assert (len(train.labels), len(val.labels), len(test.labels)) == (580, 60, 200)
    assert np.bincount(val.labels.numpy()).tolist() == [6] * 10
    pixels = train.images.load().double().div(255)
    assert torch.allclose(torch.tensor(train.mean, dtype=torch.float64), pixels.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(torch.tensor(train.std, dtype=torch.float64), pixels.std(dim=(0, 2, 3), correction=0),
                          atol=1e-6)
    assert val.mean == train.mean and test.std == train.std


def test_finetune_logs_read_back_with_tensorboard(pipeline):
    acc = events(pipeline / "runs/finetune")
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "train/lr", "val/loss", "val/acc"} <= scalars
    assert [e.step for e in acc.Scalars("val/acc")] == [18, 36]  # 580 images // 32 per step
    assert any(t.startswith("weights/net.layer4") for t in acc.Tags()["histograms"])
    assert any(t.startswith("grads/net.fc") for t in acc.Tags()["histograms"])
    assert "train/augmented_batch" in acc.Tags()["images"]
    assert acc.Tags()["graph"]
    assert "_hparams_/session_start_info" in acc.summary_metadata  # the HPARAMS tab's record
    val_acc = [e.value for e in acc.Scalars("val/acc")]
    history = pd.read_csv(pipeline / "metrics/train_history.csv")
    assert val_acc == pytest.approx(list(history.val_acc))


def test_every_stage_logs_what_it_did(pipeline):
    assert {"download/megabytes"} <= set(events(pipeline / "runs/download").Tags()["scalars"])
    pre = events(pipeline / "runs/preprocess").Tags()
    assert {"train/samples", "val/samples", "test/samples"} <= set(pre["images"])
    assert "class_counts/text_summary" in pre["tensors"]
    evaluate = events(pipeline / "runs/evaluate").Tags()
    figures = {"test/confusion_matrix", "test/reliability_diagram", "test/most_confident_mistakes"}
    assert figures <= set(evaluate["images"])
    assert sum(t.startswith("pr_curve/") for t in evaluate["tensors"]) == 10
    export = set(events(pipeline / "runs/export").Tags()["scalars"])
    assert {"export/onnx_max_abs_diff", "export/onnx_int8_test_acc"} <= export


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("file, atol", [("model.onnx", 1e-4), ("int8/model.int8.onnx", None)])
def test_onnx_runtime_matches_pytorch_on_test_images(pipeline, batch, file, atol):
    model, _ = load_model(pipeline / "models/model.pt")
    images = to_float(load_split(pipeline / "data/processed/test.pt").images[:batch])
    session = ort.InferenceSession(str(pipeline / "models" / file), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": images.numpy()})
    with torch.no_grad():
        expected = model(images).numpy()
    assert logits.shape == (batch, 10)
    if atol is not None:
        np.testing.assert_allclose(logits, expected, atol=atol)
    else:  # int8: close in scale, not bit-exact
        assert np.abs(logits - expected).max() < 0.25 * np.abs(expected).max() + 0.5


def test_torchscript_matches_pytorch(pipeline):
    model, _ = load_model(pipeline / "models/model.pt")
    images = to_float(load_split(pipeline / "data/processed/test.pt").images[:5])
    scripted = torch.jit.load(str(pipeline / "models/model.torchscript.pt"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), model(images), atol=1e-4, rtol=0)


def test_model_card_states_the_input_contract_and_traces_to_dvc_lock(pipeline):
    card = json.loads((pipeline / "models/model_card.json").read_text())
    saved = torch.load(pipeline / "models/model.pt", weights_only=True)
    assert card["classes"] == saved["classes"]
    assert card["input"]["layout"] == "NCHW" and card["input"]["value_range"] == [0.0, 1.0]
    assert card["input"]["mean"] == saved["mean"]
    assert card["training"]["train"]["lr"] == 0.05 and card["training"]["seed"] == 0
    export = json.loads((pipeline / "metrics/export.json").read_text())
    assert card["metrics"]["onnx_int8_test_acc"] == export["onnx_int8"]["test_acc"]
    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())["stages"]
    trace = card["lineage"]["stages"]
    assert trace["finetune"]["outs"]["models/model.pt"] == next(
        o["md5"] for o in lock["finetune"]["outs"] if o["path"] == "models/model.pt")
    assert card["lineage"]["model_md5"] == hashlib.md5((pipeline / "models/model.pt").read_bytes()).hexdigest()
    assert card["lineage"]["model_matches_lock"] is True
    assert trace["preprocess"]["outs"]["data/processed"] == next(
        o["md5"] for o in lock["preprocess"]["outs"] if o["path"] == "data/processed")
    assert trace["download"]["outs"]["data/raw/download"] == next(
        o["md5"] for o in lock["download"]["outs"] if o["path"] == "data/raw/download")
    assert hashlib.md5((pipeline / "data/raw/download/cifar-10-python.tar.gz").read_bytes()).hexdigest() == \
        json.loads((pipeline / "metrics/download.json").read_text())["md5"]
    assert trace["finetune"]["params"]["train"]["lr"] == 0.05


def test_dvc_plots_renders_curves_and_the_confusion_matrix(pipeline):
    shown = json.loads(run(["dvc", "plots", "show", "--json"], pipeline).stdout)["data"]
    assert {"Loss", "Accuracy", "Learning rate", "Confusion matrix", "Per-class F1", "Reliability (calibration)"} \
        <= set(shown)
    confusion = shown["Confusion matrix"][0]["content"]
    assert len(confusion["data"]["values"]) == 200  # one point per test image


def _get(url: str, body: dict | None = None):
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_the_real_tensorboard_server_shows_runs_scalars_layout_and_hparams(pipeline):
    port = free_port()
    server = subprocess.Popen(["tensorboard", "--logdir", str(pipeline / "runs"), "--host", "127.0.0.1",
                               "--port", str(port), "--load_fast", "false"], env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/data"
    try:
        deadline, runs = time.monotonic() + 90, []
        while time.monotonic() < deadline and "finetune" not in runs:
            time.sleep(0.5)
            with contextlib.suppress(OSError):
                runs = _get(f"{base}/runs")
        assert set(runs) >= {"download", "preprocess", "finetune", "evaluate", "export"}
        # Runs load one after another: wait until finetune's scalars are in.
        while time.monotonic() < deadline and "val/acc" not in _get(f"{base}/plugin/scalars/tags").get("finetune", {}):
            time.sleep(0.5)
        tags = _get(f"{base}/plugin/scalars/tags")["finetune"]
        assert {"train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "train/grad_norm"} <= set(tags)
        layout = _get(f"{base}/plugin/custom_scalars/layout")
        charts = {chart["title"]: chart["multiline"]["tag"] for cat in layout["category"] for chart in cat["chart"]}

        def drawn(chart):  # TensorBoard draws every tag that one of the chart's regular expressions matches
            return {tag for tag in tags if any(re.search(pattern, tag) for pattern in charts[chart])}

        assert drawn("loss") == {"train/loss", "val/loss"}  # not train/loss_scale
        assert drawn("accuracy") == {"train/acc", "val/acc"} and drawn("loss scale") == {"train/loss_scale"}
        experiment = _get(f"{base}/plugin/hparams/experiment", {"experimentName": ""})
        hparams = {info["name"] for info in experiment["hparamInfos"]}
        assert {"train.lr", "train.strategy", "model.weights", "seed"} <= hparams
        metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
        assert "hparam/best_val_acc" in metrics
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_queued_sweep_runs_in_parallel_and_compares_side_by_side(pipeline):
    # A ResNet18 state dict standing in for pretrained weights, loaded through model.weights.
    torch.manual_seed(7)
    torch.save(torchvision.models.resnet18().state_dict(), pipeline / "backbone.pt")
    run(["git", "add", "-A"], pipeline)
    run(["git", "commit", "-q", "-m", "backbone weights"], pipeline)
    for strategy in ("linear", "full"):  # up to finetune: evaluate and export would add a minute to CI
        out = run(["dvc", "exp", "run", "finetune", "--queue", "-n", f"strategy-{strategy}",
                   "-S", f"train.strategy={strategy}", "-S", "model.weights=backbone.pt"], pipeline).stdout
        assert "Queued experiment" in out
    run(["dvc", "queue", "start", "-j", "2"], pipeline)  # two workers: both experiments at once
    try:
        deadline = time.monotonic() + 600
        while re.search(r"\b(Queued|Running)\b", status := run(["dvc", "queue", "status"], pipeline).stdout):
            assert time.monotonic() < deadline, status
            time.sleep(2)
    finally:
        run(["dvc", "queue", "stop"], pipeline, check=False)
    assert len(re.findall(r"strategy-\w+ .*\bSuccess\b", status)) == 2, status

    shown = json.loads(run(["dvc", "exp", "show", "--json"], pipeline).stdout)
    found = {}
    for exp in (e for rev in shown for e in (rev.get("experiments") or [])):
        if exp.get("name", "").startswith("strategy-"):
            data = exp["revs"][0]["data"]
            found[exp["name"]] = (data["params"]["params.yaml"]["data"]["train"]["strategy"],
                                  data["metrics"]["metrics/train.json"]["data"])
    assert found["strategy-linear"][0] == "linear" and found["strategy-full"][0] == "full"
    linear, full = found["strategy-linear"][1], found["strategy-full"][1]
    assert linear["flops_per_image"] < full["flops_per_image"]  # no backward through a frozen backbone
    assert linear["final_train_loss"] != full["final_train_loss"]
    table = run(["dvc", "exp", "show", "--only-changed", "--md"], pipeline).stdout
    assert "strategy-linear" in table and "strategy-full" in table
    plots = json.loads(run(["dvc", "plots", "diff", "strategy-linear", "strategy-full", "--json"], pipeline).stdout)
    revisions = {point["rev"] for point in plots["data"]["Accuracy"][0]["content"]["data"]["values"]}
    assert revisions == {"strategy-linear", "strategy-full"}


@pytest.fixture
def weak_int8(pipeline, tmp_path):
    """The pipeline's model and splits, with an int8 gate it cannot pass (calibrated on one image,
    held to perfect agreement)."""
    for path in ("models/model.pt", "models/model.compressed.pt", "data/processed/train.pt", "data/processed/test.pt",
                 "data/processed/train.images.npy", "data/processed/test.images.npy", "params.yaml"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pipeline / path, tmp_path / path)
    set_params(tmp_path / "params.yaml", {"export.int8_min_agreement": 1.0, "export.calibration_images": 1})
    return tmp_path


def test_a_weak_int8_model_is_left_out_and_the_rest_ships(weak_int8):
    proc = run(["python", str(REPO / "stages/export.py")], weak_int8)
    export = json.loads((weak_int8 / "metrics/export.json").read_text())
    agreement = export["onnx_int8"]["agreement"]
    assert agreement < 1.0 and export["onnx_int8"]["shipped"] is False and export["int8_agree"] == agreement
    assert proc.stderr.strip().splitlines() == [
        f"reprotune: warning: int8 ONNX model agrees with PyTorch on {agreement:.3f} of test images "
        "(< export.int8_min_agreement 1.0): not shipped (models/int8/rejected.json says why)"]
    assert sorted(p.name for p in (weak_int8 / "models/int8").iterdir()) == ["rejected.json"]
    assert json.loads((weak_int8 / "models/int8/rejected.json").read_text())["agreement"] == agreement
    for fp32 in ("models/model.onnx", "models/model.torchscript.pt"):
        assert (weak_int8 / fp32).stat().st_size > 1_000_000  # the fp32 exports that passed are shipped
    card = json.loads((weak_int8 / "models/model_card.json").read_text())
    assert card["files"]["onnx_int8"] is None and card["verification"]["int8_shipped"] is False


@pytest.mark.reliability
@pytest.mark.parametrize("setting, message", [
    ({"export.int8": "required"}, r"int8 ONNX model agrees with PyTorch on 0\.\d+ of test images \(< "
                                  r"export.int8_min_agreement 1.0\); export.int8 is required, so nothing was written"),
    ({"export.tolerance": 1e-12}, r"onnx export differs from PyTorch by \S+ \(> export.tolerance 1e-12\); "
                                  r"nothing was written"),
])
def test_an_export_gate_that_fails_the_stage_writes_nothing(weak_int8, setting, message):
    set_params(weak_int8 / "params.yaml", setting)
    before = sorted(p for p in weak_int8.rglob("*"))
    proc = run(["python", str(REPO / "stages/export.py")], weak_int8, check=False)
    assert proc.returncode == 1
    assert re.fullmatch(f"reprotune: error: {message}", proc.stderr.strip()), proc.stderr
    assert sorted(p for p in weak_int8.rglob("*")) == before
