"""Drift monitoring: the tests on their own (real samples, real shifts), the reference the evaluate
stage writes, `reprotune monitor` on folders and archives of PNGs, the monitor stage, and bad input."""

from __future__ import annotations

import json
import shutil
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures import MEAN, STD, events, run
from reprotune.cli import app
from reprotune.data.splits import Split, load_split, to_float
from reprotune.data.synthetic import SYNTHETIC_CLASSES, synthetic_images
from reprotune.errors import ReprotuneError
from reprotune.evaluation.drift import FAMILIES, Incoming, detect, mmd_test, monitor, read_incoming, verdict
from reprotune.evaluation.reference import INPUT_STATS, build_reference, image_stats, load_reference, observe
from reprotune.inference.requestlog import ROTATE_EVERY, RequestLog
from reprotune.training.model import load_model

CLASSES = SYNTHETIC_CLASSES
TEST_METRICS = {"test_acc": 0.5, "macro_f1": 0.5, "ece": 0.1}


def synthetic(n: int, seed: int, labels: np.ndarray | None = None) -> Split:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n) if labels is None else labels
    images = torch.from_numpy(synthetic_images(labels, rng).reshape(-1, 3, 32, 32))
    return Split(images, torch.from_numpy(labels), CLASSES, MEAN, STD)


@pytest.fixture(scope="module")
def trained(pipeline):
    """The tiny pipeline's trained model, and a reference from 1,000 fresh held-out images."""
    model, _ = load_model(pipeline / "models/model.pt")
    return model, build_reference(model, synthetic(1000, 100), TEST_METRICS, "md5")


def _check(trained, images: torch.Tensor) -> dict:
    model, reference = trained
    return detect(reference, observe(model, images), permutations=200)


def test_input_statistics_move_the_way_their_names_say():
    images = synthetic(64, 1).images
    base = image_stats(images)
    assert base.shape == (64, len(INPUT_STATS))
    brighter = image_stats((images.float() * 1.3).clamp(0, 255).to(torch.uint8))
    assert (brighter[:, :3] > base[:, :3]).mean() > 0.9  # every channel's mean rises
    blurred = image_stats(torch.nn.functional.avg_pool2d(images.float(), 3, 1, 1).round().to(torch.uint8))
    assert (blurred[:, 5] < base[:, 5]).all()  # blur lowers sharpness
    flat = image_stats(torch.full((2, 3, 8, 8), 128, dtype=torch.uint8))
    assert flat[:, 3].max() == 0 and flat[:, 4].max() == 0 and flat[:, 5].max() == 0
    assert flat[0, :3] == pytest.approx([128 / 255] * 3)


def test_the_mmd_permutation_test_holds_its_level_and_sees_a_small_shift():
    rng = np.random.default_rng(0)
    same = [mmd_test(rng.normal(size=(60, 8)), rng.normal(size=(40, 8)), 99, seed)[1] for seed in range(60)]
    # Under no shift the p-value is uniform: about 5% below 0.05 (binomial 60 x 0.05: 8 or more is < 1%).
    assert sum(p < 0.05 for p in same) <= 8 and 0.3 < np.mean(same) < 0.7
    shifted = mmd_test(rng.normal(size=(60, 8)), rng.normal(0.8, 1, size=(40, 8)), 99, 0)
    assert shifted[1] == pytest.approx(1 / 100) and shifted[0] > 0


def test_held_out_images_of_the_training_distribution_are_no_drift(trained):
    for seed in (1, 2, 3):
        report = _check(trained, synthetic(500, 200 + seed).images)
        assert report["verdict"] == "no drift detected" and report["strength"] == "none", report
        assert not report["drift"] and report["drifted"] == []


@pytest.mark.parametrize(("shift", "family"), [
    ("darker", "input"), ("noise", "input"), ("blur", "input"), ("new class", "features"),
    ("missing classes", "predictions"),
])
def test_real_shifts_are_drift_in_the_family_that_should_see_them(trained, shift, family):
    labels = np.random.default_rng(5).integers(0, 10, 500)
    if shift == "missing classes":  # no yellow or purple images: each image is normal, the mix is not
        labels = np.random.default_rng(5).choice([0, 1, 2, 5, 6, 7], 500)
    images = synthetic(500, 300, labels).images.float()
    if shift == "darker":
        images = images * 0.6
    elif shift == "noise":
        images = images + torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 40
    elif shift == "blur":
        images = torch.nn.functional.avg_pool2d(images, 3, 1, 1)
    elif shift == "new class":  # diagonal stripes in a colour none of the classes has
        ramp = torch.arange(32.0)
        stripes = torch.sin((ramp[:, None] + ramp[None, :]) * 0.9)
        images = (torch.tensor([40.0, 200.0, 200.0]).view(1, 3, 1, 1) + 30 * stripes
                  + torch.randn(500, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 40)
    report = _check(trained, images.round().clamp(0, 255).to(torch.uint8))
    assert report["drift"] and family in report["drifted"], (shift, report["drifted"],
                                                             {f: report[f]["p_value"] for f in FAMILIES})
    assert report["verdict"].startswith("drift detected in ") and report["verdict"].endswith(": consider retraining")
    assert report["strength"] == "strong"


def test_the_verdict_is_as_strong_as_the_evidence(trained):
    model, reference = trained
    threshold = 0.05 / 3
    # No drift, a borderline p-value (the demo's 0.0139 against 0.0167) and a p-value far below.
    assert verdict([], "none", 0.4, threshold) == "no drift detected"
    borderline = verdict(["predictions"], "borderline", 0.0139, threshold)
    assert borderline == ("possible drift in predictions (borderline: adjusted p 0.0139 vs threshold 0.0167): "
                          "look closer (TensorBoard) or check a larger sample")
    assert "retrain" not in borderline
    # detect() grades by the lowest adjusted p-value: find a sample whose p-value falls in each band.
    images = synthetic(500, 300).images
    observed = observe(model, images)
    report = detect(reference, observed, permutations=200)
    assert report["strength"] == "none" and report["verdict"] == "no drift detected"
    darker = detect(reference, observe(model, (images.float() * 0.6).to(torch.uint8)), permutations=200)
    assert darker["strength"] == "strong" and darker["verdict"].startswith("drift detected in ")
    # The same check with alpha set so that its lowest p-value is just under the threshold: borderline.
    lowest = min(report[f]["p_value"] for f in FAMILIES)
    edge = detect(reference, observed, alpha=3 * lowest * 1.5, permutations=200)
    assert edge["drift"] and edge["strength"] == "borderline", edge
    assert edge["verdict"].startswith("possible drift in ") and "(borderline: adjusted p " in edge["verdict"]


def test_the_first_test_images_are_a_fair_sample(pipeline):
    # The demo's first 300 test images once gave a borderline alarm: the split keeps the archive's
    # order, which the synthetic set (like CIFAR's test batch) shuffles, so its first images hold every
    # class in about equal shares and are a fair sample, and a borderline p-value there is the false-alarm
    # rate at work, not a skewed sample.
    labels = load_split(pipeline / "data/processed/test.pt").labels[:100].numpy()
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 3 and counts.max() <= 20, counts  # 100 images: about 10 of each class


def test_labelled_images_report_accuracy_f1_and_ece_next_to_the_test_split(trained):
    model, reference = trained
    split = synthetic(300, 400)
    report, _ = monitor(model, reference, Incoming(split.images, split.labels, []), permutations=99)
    with torch.no_grad():
        expected = (model(to_float(split.images)).argmax(1) == split.labels).double().mean().item()
    assert report["labelled"]["accuracy"] == pytest.approx(expected)
    assert report["labelled"]["test_accuracy"] == TEST_METRICS["test_acc"]
    assert 0 <= report["labelled"]["ece"] <= 1 and 0 <= report["labelled"]["macro_f1"] <= 1


def reprotune(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """The `reprotune` console script in this process (its exit code, stdout, stderr): a new process
    per command would cost seconds of imports each."""
    monkeypatch.setattr(sys, "argv", ["reprotune", *args])
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _write_pngs(folder, images: torch.Tensor, names=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{names[i] if names else i:05d}.png")


def test_the_evaluate_stage_writes_a_reference_for_its_model(pipeline):
    reference = load_reference(pipeline / "models/reference.pt", pipeline / "models/model.pt")
    val = load_split(pipeline / "data/processed/val.pt")
    evaluate = json.loads((pipeline / "metrics/evaluate.json").read_text())
    assert reference["images"] == len(val.labels) and reference["classes"] == val.classes
    assert reference["stats"] == pytest.approx(image_stats(val.images))
    assert reference["test"]["test_acc"] == evaluate["test_acc"]
    # The MMD's reference half is disjoint from the half the PCA was fitted on.
    assert len(reference["features"]) == len(val.labels) - len(val.labels) // 2


def test_reprotune_monitor_on_folders_and_archives(pipeline, tmp_path, capsys, monkeypatch):
    test = load_split(pipeline / "data/processed/test.pt")
    plain, shifted, labelled = tmp_path / "plain", tmp_path / "shifted", tmp_path / "labelled"
    _write_pngs(plain, test.images[:150])
    (plain / "00000.json").write_text("{}")  # the server's sidecars are not images: not read, not counted
    (plain / "broken.png").write_bytes(b"not a png")
    _write_pngs(shifted, (test.images[:150].float() * 0.4).to(torch.uint8))
    for c, name in enumerate(test.classes[:3]):
        chosen = test.images[test.labels == c][:10]
        _write_pngs(labelled / name, chosen)
    with tarfile.open(tmp_path / "shifted.tar.gz", "w:gz") as tar:
        tar.add(shifted, arcname="batch-7")  # an archive wrapping its folder, as archives do

    out = tmp_path / "out"
    base = ["monitor", "--model", str(pipeline / "models/model.pt"),
            "--reference", str(pipeline / "models/reference.pt"), "--params", str(pipeline / "params.yaml")]
    code, stdout, stderr = reprotune([*base, str(plain), "--metrics", str(out / "plain.json"), "--logdir",
                                      str(out / "plain"), "--fail-on-drift"], capsys, monkeypatch)
    assert code == 0 and stdout.startswith("no drift detected (150 images; adjusted p: input "), (stdout, stderr)
    assert stderr.count("reprotune: skipped:") == 1 and "broken.png" in stderr
    report = json.loads((out / "plain.json").read_text())
    assert report["images"] == 150 and report["unreadable"] == 1 and report["drift"] is False
    scalars, histograms = events(out / "plain").Tags()["scalars"], events(out / "plain").Tags()["histograms"]
    assert {"monitor/input_p_value", "monitor/features_p_value", "monitor/drift"} <= set(scalars)
    assert {"monitor/reference/contrast", "monitor/new/contrast", "monitor/new/confidence"} <= set(histograms)

    drift = run(["reprotune", *base, str(tmp_path / "shifted.tar.gz"), "--metrics", str(out / "shifted.json"),
                 "--logdir", str(out / "shifted"), "--fail-on-drift"], tmp_path, check=False)  # a real process
    assert drift.returncode == 3, drift.stderr
    assert drift.stdout.startswith("drift detected in input") and ": consider retraining (150 images" in drift.stdout
    assert json.loads((out / "shifted.json").read_text())["drift"] is True

    code, stdout, _ = reprotune([*base, str(labelled), "--metrics", str(out / "labelled.json"), "--logdir",
                                 str(out / "l")], capsys, monkeypatch)
    assert code == 0 and "; accuracy " in stdout
    labelled_report = json.loads((out / "labelled.json").read_text())["labelled"]
    model, _ = load_model(pipeline / "models/model.pt")
    incoming = read_incoming(labelled, test.classes, 32)
    with torch.no_grad():
        accuracy = (model(to_float(incoming.images)).argmax(1) == incoming.labels).double().mean().item()
    assert labelled_report["accuracy"] == pytest.approx(accuracy)
    assert sorted(set(incoming.labels.tolist())) == [0, 1, 2]


@pytest.mark.reliability
def test_bad_input_is_one_line_and_writes_nothing(pipeline, tmp_path, capsys, monkeypatch):
    metrics, logdir = tmp_path / "m.json", tmp_path / "runs"
    base = ["monitor", "--metrics", str(metrics), "--logdir", str(logdir),
            "--params", str(pipeline / "params.yaml")]
    model = ["--model", str(pipeline / "models/model.pt")]
    reference = ["--reference", str(pipeline / "models/reference.pt")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable/a.png").write_bytes(b"\x89PNG broken")
    _write_pngs(tmp_path / "strangers/not-a-class", load_split(pipeline / "data/processed/test.pt").images[:3])
    _write_pngs(tmp_path / "fine", load_split(pipeline / "data/processed/test.pt").images[:3])
    other = tmp_path / "other.pt"
    shutil.copy(pipeline / "models/model.pt", other)
    with other.open("ab") as f:
        f.write(b"\0")  # another file: not the model the reference was made for
    cases = {
        "empty": ([*base, *model, *reference, str(tmp_path / "empty")], "no image files"),
        "missing": ([*base, *model, *reference, str(tmp_path / "nowhere")], "no such folder or archive"),
        "unreadable": ([*base, *model, *reference, str(tmp_path / "unreadable")], "none of its 1 image files"),
        "classes": ([*base, *model, *reference, str(tmp_path / "strangers")],
                    "class folders not-a-class are not among the model's classes"),
        "no reference": ([*base, *model, "--reference", str(tmp_path / "none.pt"), str(tmp_path / "fine")],
                         "has no drift reference"),
        "other model": ([*base, "--model", str(other), *reference, str(tmp_path / "fine")],
                        "was made for another model"),
    }
    for name, (args, message) in cases.items():
        code, stdout, stderr = reprotune(args, capsys, monkeypatch)
        assert code == 1, (name, stdout, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("reprotune: error: ") and message in lines[0], (name, lines)
        assert not metrics.exists() and not logdir.exists(), name


def test_the_monitor_stage_checks_data_incoming_when_it_has_images(pipeline, tmp_path):
    # After the fixture's `dvc repro`: the repository's data/incoming/ holds only its README.
    assert json.loads((pipeline / "metrics/monitor.json").read_text()) == {
        "drift": False, "verdict": "no incoming images", "images": 0}
    project = tmp_path / "project"
    shutil.copytree(pipeline, project, symlinks=True)
    _write_pngs(project / "data/incoming", (load_split(project / "data/processed/test.pt").images[:120].float()
                                            * 0.4).to(torch.uint8))
    status = run(["dvc", "status", "monitor"], project).stdout
    assert "data/incoming" in status and "modified" in status
    proc = run(["dvc", "repro", "monitor"], project)
    assert "drift detected in input" in proc.stdout
    report = json.loads((project / "metrics/monitor.json").read_text())
    assert report["drift"] is True and report["images"] == 120
    assert report["features"]["tests"]["mmd"]["permutations"] == 500  # monitor.permutations from params.yaml
    assert "monitor/drift" in events(project / "runs/monitor").Tags()["scalars"]
    assert "Stage 'monitor' didn't change" in run(["dvc", "repro", "monitor"], project).stdout


def test_an_ad_hoc_check_leaves_the_monitor_stage_and_dvc_status_alone(pipeline, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(pipeline, project, symlinks=True)
    stage_outputs = {p: p.read_bytes() for p in [project / "metrics/monitor.json",
                                                  *(project / "runs/monitor").rglob("*")] if p.is_file()}
    _write_pngs(tmp_path / "batch", load_split(project / "data/processed/test.pt").images[:60])
    proc = run(["reprotune", "monitor", str(tmp_path / "batch")], project)  # every default, as a user types it
    assert proc.stdout.startswith(("no drift", "possible drift", "drift detected")), proc.stdout
    assert {p: p.read_bytes() for p in stage_outputs} == stage_outputs
    assert not set((project / "runs/monitor").rglob("*")) - set(stage_outputs)
    assert "monitor/drift" in events(project / "runs/monitor-adhoc").Tags()["scalars"]
    assert run(["dvc", "status"], project).stdout.strip() == "Data and pipelines are up to date."
    assert "monitor-adhoc" not in run(["git", "status", "--porcelain"], project).stdout  # ignored, like lr-find's


def test_the_request_log_keeps_the_newest_images_with_their_predictions(tmp_path, pipeline):
    test = load_split(pipeline / "data/processed/test.pt")
    folder = tmp_path / "requests"
    log = RequestLog(folder, test.classes, max_images=30, max_mb=100)
    logits = np.eye(10, dtype=np.float32)[np.arange(ROTATE_EVERY + 20) % 10] * 5
    images = to_float(test.images[: ROTATE_EVERY + 20]).numpy()
    for start in range(0, len(images), 10):  # requests of 10 images
        log.record(images[start:start + 10], logits[start:start + 10])
    pngs = sorted(folder.glob("*.png"))
    # Rotated at the 100th image down to the newest 30; 20 more since.
    assert len(pngs) == 50 and not list(folder.glob(".*"))
    meta = json.loads(pngs[-1].with_suffix(".json").read_text())
    assert meta["prediction"] == test.classes[(ROTATE_EVERY + 19) % 10] and meta["probability"] > 0.9
    assert len(meta["top"]) == 3
    # The PNGs hold what the model saw, and monitor reads the folder (leaving the JSON alone).
    incoming = read_incoming(folder, test.classes, 32)
    assert torch.equal(incoming.images[-1], test.images[ROTATE_EVERY + 19]) and incoming.unreadable == []
    assert len(incoming.images) == 50 and incoming.labels is None
    small = RequestLog(tmp_path / "small", test.classes, max_images=1000, max_mb=0)
    small.record(images[:3], logits[:3])
    small.rotate()
    assert list((tmp_path / "small").iterdir()) == []  # a size bound of 0 keeps nothing


def test_reading_a_folder_does_not_take_other_files_for_images(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "0001.json").write_text("{}")
    with pytest.raises(ReprotuneError, match="no image files"):
        read_incoming(tmp_path, CLASSES, 32)


def test_one_class_folder_is_a_label_and_a_wrapping_folder_is_looked_into(tmp_path):
    images = synthetic(4, 1).images
    _write_pngs(tmp_path / "one" / CLASSES[3], images)
    assert read_incoming(tmp_path / "one", CLASSES, 32).labels.tolist() == [3] * 4
    _write_pngs(tmp_path / "wrapped/batch" / CLASSES[1], images)
    _write_pngs(tmp_path / "wrapped/batch" / CLASSES[2], images[:2])
    shutil.make_archive(str(tmp_path / "wrapped"), "zip", tmp_path / "wrapped")  # wrapped.zip: batch/<class>/
    incoming = read_incoming(tmp_path / "wrapped.zip", CLASSES, 32)
    assert sorted(incoming.labels.tolist()) == [1] * 4 + [2] * 2
    # PNG is lossless: the pixels written (in the archive's order)
    assert sorted(x.numpy().tobytes() for x in incoming.images[incoming.labels == 1]) == sorted(
        x.numpy().tobytes() for x in images)


def test_a_small_validation_split_still_gets_a_reference_but_no_check(trained):
    model, _ = trained
    tiny = build_reference(model, synthetic(5, 7), TEST_METRICS, "md5")  # the evaluate stage must not fail
    assert tiny["images"] == 5 and tiny["pca_components"].shape[0] == 1
    with pytest.raises(ReprotuneError, match=r"holds 5 validation images; a check needs 20"):
        monitor(model, tiny, Incoming(synthetic(30, 8).images, None, []))
