"""`reprotune predict` on real image files with the exported models of a finished pipeline."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import run
from reprotune.data import load_split


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
    for model in ("models/model.torchscript.pt", "models/model.int8.onnx"):
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
    (tmp_path / "big.png").write_bytes(_png_claiming(8_000, 6_000))  # ours: 48 MP > 40 MP
    proc = run(["reprotune", "predict", str(tmp_path / "empty.png"), str(tmp_path / "bomb.png"),
                str(tmp_path / "big.png"), str(folder / "exact.png")], pipeline, check=False)
    assert proc.returncode == 1
    errors = proc.stderr.strip().splitlines()
    assert errors[0] == f"reprotune: error: {tmp_path / 'empty.png'}: not a readable image"
    for line, name in zip(errors[1:], ("bomb.png", "big.png"), strict=True):
        assert line == f"reprotune: error: {tmp_path / name}: too large to decode (more than 40,000,000 pixels)"
    assert list(_lines(proc.stdout)) == ["exact.png"]
