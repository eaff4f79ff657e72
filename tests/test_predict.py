"""`reprotune predict` on real image files with the exported models of a finished pipeline."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import zlib

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from fixtures import env, run
from reprotune.data.splits import load_split


@pytest.fixture(scope="module")
def images(pipeline, tmp_path_factory):
    """Test images saved as PNG (lossless, 32 px and upscaled) and JPEG, plus a fake PNG."""
    folder = tmp_path_factory.mktemp("images")
    test = load_split(pipeline / "data/processed/test.pt")
    pixels = [test.images[i].permute(1, 2, 0).numpy() for i in range(3)]
    Image.fromarray(pixels[0]).save(folder / "exact.png")
    Image.fromarray(pixels[1]).resize((320, 200), Image.Resampling.NEAREST).save(folder / "wide.png")
    Image.fromarray(pixels[2]).convert("RGB").resize((64, 64)).save(folder / "photo.jpg", quality=90)
    Image.fromarray(pixels[2]).convert("L").resize((100, 100)).save(folder / "grey.jpeg")
    (folder / "notes.txt").write_text("not an image, and not named like one")
    return folder, test


def _lines(stdout: str) -> dict[str, dict]:
    return {json.loads(line)["file"].rsplit("/", 1)[-1]: json.loads(line) for line in stdout.splitlines()}


def test_predicts_png_and_jpeg_of_any_size(pipeline, images):
    folder, test = images
    files = [str(folder / n) for n in ("exact.png", "wide.png", "photo.jpg", "grey.jpeg")]
    proc = run(["reprotune", "predict", *files, "--top-k", "3"], pipeline)
    results = _lines(proc.stdout)
    assert set(results) == {"exact.png", "wide.png", "photo.jpg", "grey.jpeg"}
    for result in results.values():
        probs = [entry["probability"] for entry in result["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(entry["label"] in test.classes for entry in result["top_k"])
    # A lossless 32x32 PNG gives exactly the probabilities ONNX Runtime gives on the tensor.
    session = ort.InferenceSession(str(pipeline / "models/model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": test.images[:1].numpy().astype(np.float32) / 255})[0][0]
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    best = results["exact.png"]["top_k"][0]
    assert best["label"] == test.classes[int(expected.argmax())]
    assert best["probability"] == pytest.approx(float(expected.max()), abs=1e-5)


@pytest.mark.reliability
def test_a_directory_is_classified_and_a_fake_png_is_named(pipeline, images, tmp_path):
    folder, _ = images
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    (mixed / "broken.png").write_text("this is text, renamed .png")
    proc = run(["reprotune", "predict", str(mixed), "--batch-size", "2", "--top-k", "1"], pipeline, check=False)
    assert proc.returncode == 1
    assert set(_lines(proc.stdout)) == {"exact.png", "wide.png", "photo.jpg", "grey.jpeg"}
    assert proc.stderr.strip() == f"reprotune: error: {mixed / 'broken.png'}: not a readable image"


def test_torchscript_and_int8_exports_classify_too(pipeline, images):
    folder, _ = images
    for model in ("models/model.torchscript.pt", "models/int8/model.int8.onnx"):
        proc = run(["reprotune", "predict", str(folder / "exact.png"), "--model", model, "--top-k", "2"], pipeline)
        assert len(_lines(proc.stdout)["exact.png"]["top_k"]) == 2


@pytest.mark.reliability
def test_missing_or_foreign_models_are_refused(pipeline, images, tmp_path):
    folder, _ = images
    image = str(folder / "exact.png")
    proc = run(["reprotune", "predict", image, "--model", str(tmp_path / "none.onnx")], pipeline, check=False)
    assert proc.returncode == 1 and "none.onnx: model not found" in proc.stderr
    shutil.copy(pipeline / "models/model.onnx", tmp_path / "model.onnx")  # no model card beside it
    proc = run(["reprotune", "predict", image, "--model", str(tmp_path / "model.onnx")], pipeline, check=False)
    assert proc.returncode == 1 and "not a reprotune export" in proc.stderr and proc.stdout == ""
    (tmp_path / "model_card.json").write_text((pipeline / "models/model_card.json").read_text())
    (tmp_path / "model.onnx").write_bytes(b"garbage")
    proc = run(["reprotune", "predict", image, "--model", str(tmp_path / "model.onnx")], pipeline, check=False)
    assert proc.returncode == 1 and "cannot load the model" in proc.stderr


@pytest.mark.reliability
def test_a_model_switched_off_names_the_param_that_turns_it_on(pipeline, images):
    # The tiny pipeline runs with export.executorch off and compress.ratio 0: the stage leaves a note
    # where each model would be, and predict reads it rather than saying "run make demo".
    image = str(images[0] / "exact.png")
    for model, param in (("models/executorch/model.pte", "export.executorch"),
                         ("models/executorch/model.int8.pte", "export.executorch"),
                         ("models/compressed/model.onnx", "compress.ratio")):
        proc = run(["reprotune", "predict", image, "--model", model], pipeline, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"reprotune: error: {model}: not exported: ") and param in lines[0], lines
        assert "make demo" not in lines[0] and "set " in lines[0], lines


def test_people_read_4_decimals_and_programs_every_digit(pipeline, images):
    image = str(images[0] / "exact.png")
    text = run(["reprotune", "predict", image, "--text"], pipeline).stdout.strip()
    assert re.fullmatch(rf"{re.escape(image)}: \S+ [01]\.\d{{4}}, \S+ [01]\.\d{{4}}, \S+ [01]\.\d{{4}}", text), text
    piped = _lines(run(["reprotune", "predict", image], pipeline).stdout)["exact.png"]  # not a terminal: JSON
    assert any(len(repr(entry["probability"])) > 8 for entry in piped["top_k"]), piped  # float64, unrounded
    assert text.split(", ")[0].endswith(f"{piped['top_k'][0]['probability']:.4f}")
    # On a terminal, text by default.
    leader, follower = pty.openpty()
    try:
        subprocess.run(["reprotune", "predict", image], cwd=pipeline, env=env(), stdout=follower, check=True,
                       stderr=subprocess.DEVNULL, timeout=120)
        shown = os.read(leader, 65536).decode().strip()
    finally:
        os.close(leader)
        os.close(follower)
    assert shown == text


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header is rewritten to claim width x height pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    png = bytearray(buffer.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature, length and type
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


@pytest.mark.reliability
def test_empty_and_enormous_images_are_refused_without_decoding(pipeline, images, tmp_path):
    folder, _ = images
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(_png_claiming(50_000, 50_000))  # PIL's own limit
    (tmp_path / "big.png").write_bytes(_png_claiming(10_000, 8_000))  # ours: 80 MP to decode > 64 MP
    proc = run(["reprotune", "predict", str(tmp_path / "empty.png"), str(tmp_path / "bomb.png"),
                str(tmp_path / "big.png"), str(folder / "exact.png")], pipeline, check=False)
    assert proc.returncode == 1
    errors = proc.stderr.strip().splitlines()
    assert errors[0] == f"reprotune: error: {tmp_path / 'empty.png'}: not a readable image"
    for line, name in zip(errors[1:], ("bomb.png", "big.png"), strict=True):
        assert line == f"reprotune: error: {tmp_path / name}: too large to decode (more than 64,000,000 pixels)"
    assert list(_lines(proc.stdout)) == ["exact.png"]


def _probabilities(stdout: str) -> dict[str, dict[str, float]]:
    return {name: {e["label"]: e["probability"] for e in result["top_k"]} for name, result in _lines(stdout).items()}


def test_real_photos_orientation_size_and_transparency(pipeline, images, tmp_path):
    folder, test = images
    upright = Image.fromarray(test.images[3].permute(1, 2, 0).numpy()).resize((320, 240), Image.Resampling.BICUBIC)
    upright.save(tmp_path / "upright.jpg", quality=95)
    # A phone photo shot turned: pixels stored rotated, EXIF orientation 6 says "rotate 90 cw to view".
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.rotate(90, expand=True).save(tmp_path / "turned.jpg", quality=95, exif=exif)
    # 48 megapixels (8000 x 6000): decoded at 1/8 scale in draft mode, classified rather than refused.
    upright.resize((8000, 6000), Image.Resampling.BICUBIC).save(tmp_path / "phone48mp.jpg", quality=90)
    # Transparency: the same picture with an all-opaque alpha gives the same answer; a fully
    # transparent one is the stated white background.
    rgba = upright.convert("RGBA")
    rgba.save(tmp_path / "opaque.png")
    rgba.putalpha(0)
    rgba.save(tmp_path / "transparent.png")
    Image.new("RGB", (320, 240), (255, 255, 255)).save(tmp_path / "white.png")
    names = ["upright.jpg", "turned.jpg", "phone48mp.jpg", "opaque.png", "transparent.png", "white.png"]
    proc = run(["reprotune", "predict", *(str(tmp_path / n) for n in names), "--top-k", "10"], pipeline)
    got = _probabilities(proc.stdout)
    assert set(got) == set(names)
    for name in ("turned.jpg", "phone48mp.jpg"):  # same classes, probabilities within JPEG noise
        assert max(got[name], key=got[name].get) == max(got["upright.jpg"], key=got["upright.jpg"].get), name
        assert max(abs(got[name][c] - p) for c, p in got["upright.jpg"].items()) < 0.1, name
    assert got["transparent.png"] == pytest.approx(got["white.png"], abs=1e-6)


@pytest.mark.reliability
def test_a_directory_without_images_is_one_error(pipeline, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no images here")
    for folder in ("empty", "texts"):
        proc = run(["reprotune", "predict", str(tmp_path / folder)], pipeline, check=False)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.startswith(f"reprotune: error: {tmp_path / folder}: no image files in this directory")
        assert len(proc.stderr.strip().splitlines()) == 1


def test_onnx_prediction_does_not_import_torch(pipeline, images):
    folder, _ = images
    probe = ("import sys; from reprotune.cli import app; sys.argv = ['reprotune', 'predict', "
             f"{str(folder / 'exact.png')!r}]\ntry:\n    app()\nfinally:\n    print('torch' in sys.modules)")
    proc = run(["python", "-c", probe], pipeline)
    assert proc.stdout.strip().splitlines()[-1] == "False"
