"""`reprotune predict`: classify image files with an exported model, no training code needed.

The model card beside the export (`model_card.json`) says how to feed it: RGB, float32 in [0, 1],
32x32; normalization is inside the model. Images of any size are decoded (bounded), converted to
RGB and resized with antialiasing, then classified in batches.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from reprotune.errors import ReprotuneError
from reprotune.export import onnx_runner, torchscript_runner

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_PIXELS = 40_000_000  # refuse to decode anything larger (a decompression bomb, or not a photo)


@dataclass
class Predictor:
    """An exported model and what it needs: float32 (N, 3, size, size) in [0, 1] -> logits."""

    run: Callable[[np.ndarray], np.ndarray]
    classes: list[str]
    size: int


def load_predictor(model: Path) -> Predictor:
    """Load an ONNX (ONNX Runtime) or TorchScript export with the model card beside it."""
    if not model.is_file():
        raise ReprotuneError(f"{model}: model not found (run `make demo` or `dvc repro` first)")
    card_path = model.parent / "model_card.json"
    try:
        card = json.loads(card_path.read_text())
        listed = set(card["files"].values())
        classes, size = list(card["classes"]), int(card["input"]["shape"][2])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise ReprotuneError(f"{model}: not a reprotune export (no valid model_card.json beside it)") from None
    if model.name not in listed:
        raise ReprotuneError(f"{model}: not a reprotune export ({card_path} lists {', '.join(sorted(listed))})")
    try:
        run = onnx_runner(model) if model.suffix == ".onnx" else torchscript_runner(model)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime and torch.jit raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ReprotuneError(f"{model}: cannot load the model ({first})") from None
    return Predictor(run, classes, size)


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode an image file into float32 (3, size, size) RGB in [0, 1]; bounded in pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{image.width}x{image.height}")
                image.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale, far less work
                rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ReprotuneError(f"{path}: too large to decode (more than {MAX_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise ReprotuneError(f"{path}: not a readable image") from None
    except OSError as exc:
        raise ReprotuneError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255


def expand(paths: list[Path]) -> Iterator[Path]:
    """Files as given; for a directory, the image files in it (by suffix), sorted."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def classify(paths: list[Path], predictor: Predictor, top_k: int, batch_size: int
             ) -> Iterator[tuple[Path, dict | None, str | None]]:
    """(file, result, None) per classified image, (file, None, error) per file that failed."""
    pending: list[tuple[Path, np.ndarray]] = []
    for path in expand(paths):
        try:
            pending.append((path, load_image(path, predictor.size)))
        except ReprotuneError as exc:
            yield path, None, str(exc)
        if len(pending) == batch_size:
            yield from _run(pending, predictor, top_k)
            pending = []
    yield from _run(pending, predictor, top_k)


def _run(batch: list[tuple[Path, np.ndarray]], predictor: Predictor, top_k: int):
    if not batch:
        return
    logits = predictor.run(np.stack([image for _, image in batch])).astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for (path, _), row in zip(batch, probs, strict=True):
        best = np.argsort(-row, kind="stable")[:top_k]
        yield path, {"file": str(path), "top_k": [{"label": predictor.classes[i], "probability": float(row[i])}
                                                  for i in best]}, None
