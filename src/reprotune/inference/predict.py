"""`reprotune predict`: classify image files with an exported model, no training code needed.

The model card beside the export (`model_card.json`) says how to feed it: RGB, float32 in [0, 1],
`size` x `size`; normalization is inside the model. Files are decoded as `reprotune.images` says
(orientation, draft decoding, transparency, resize and centre crop), then classified in batches.
ONNX models run without torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reprotune.errors import ReprotuneError
from reprotune.images import SUFFIXES, load_image
from reprotune.inference.modelcard import input_side, load_card
from reprotune.inference.runtime import Runner, executorch_runner, onnx_runner, softmax, torchscript_runner


@dataclass
class Predictor:
    """An exported model and what it needs: float32 (N, 3, size, size) in [0, 1] -> logits."""

    run: Runner
    classes: list[str]
    size: int


# What the export stage leaves in a model's folder when it did not make that model (export/phone.py and
# export/release.py write them): how to read the note's first clause, which names the param, and what
# turns the model on.
SWITCHED_OFF = {
    "disabled.txt": (". ", "set it to true (with the mobile extra: pip install -c constraints.txt -e '.[mobile]'), "
                           "then `dvc repro export`"),
    "not_pruned.json": (": ", "set compress.ratio above 0 (e.g. `dvc exp run -S compress.ratio=0.3`)"),
}
REJECTED = "rejected.json"  # made, but below its gate: the verdict names the gate's param


def not_made(model: Path) -> str | None:
    """Why the export stage made no `model`, from the note it left beside it, with the param that
    turns it on; None when there is no such note (the pipeline has not run)."""
    for name, (clause, fix) in SWITCHED_OFF.items():
        if (model.parent / name).is_file():
            reason = _note(model.parent / name).split(clause)[0].strip() or "switched off"
            return f"{model}: not exported: {reason}; {fix}"
    rejected = model.parent / REJECTED
    if rejected.is_file():
        return f"{model}: not shipped: {_note(rejected) or 'below its gate'} (see {rejected})"
    return None


def _note(path: Path) -> str:
    """A note's text: a JSON note's verdict, a text note as it is."""
    text = path.read_text()
    if path.suffix != ".json":
        return text.strip()
    try:
        return str(json.loads(text).get("verdict", "")).strip()
    except (ValueError, AttributeError):
        return ""


def load_predictor(model: Path) -> Predictor:
    """Load an ONNX (ONNX Runtime), TorchScript or ExecuTorch export with the model card beside it."""
    if not model.is_file():
        raise ReprotuneError(not_made(model) or f"{model}: model not found (run `make demo` or `dvc repro` first)")
    card = load_card(model)
    try:
        run = {".onnx": onnx_runner, ".pte": executorch_runner}.get(model.suffix, torchscript_runner)(model)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime, torch.jit and ExecuTorch raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ReprotuneError(f"{model}: cannot load the model ({first})") from None
    return Predictor(run, card["classes"], input_side(card))


def expand(paths: list[Path]) -> Iterator[Path]:
    """Files as given; for a directory, the image files in it (by suffix), sorted. A directory
    with no image files is an error."""
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not found:
                raise ReprotuneError(f"{path}: no image files in this directory "
                                     f"({', '.join(sorted(SUFFIXES))})")
            yield from found
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
    images = np.stack([image for _, image in batch]).astype(np.float32) / 255
    probs = softmax(predictor.run(images))
    for (path, _), row in zip(batch, probs, strict=True):
        best = np.argsort(-row, kind="stable")[:top_k]
        yield path, {"file": str(path), "top_k": [{"label": predictor.classes[i], "probability": float(row[i])}
                                                  for i in best]}, None
