"""The model card (models/model_card.json): written by the export stage (export/card.py), read by
`reprotune predict` and the server. One place for its shape, apart from both so that neither's edits
rerun the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from reprotune.errors import ReprotuneError


class CardInput(TypedDict):
    name: str  # the graph's input name
    layout: str  # NCHW
    dtype: str
    channels: str  # RGB
    shape: list[int | str]  # ["batch", 3, side, side]
    value_range: list[float]
    normalization: str
    mean: list[float]
    std: list[float]
    resize: str


class CardOutput(TypedDict):
    name: str
    shape: list[int | str]  # ["batch", classes]
    meaning: str


class CardFiles(TypedDict):
    """Paths relative to the card; None for a file not made or not shipped."""

    onnx: str
    torchscript: str
    onnx_int8: str | None
    executorch: str | None
    executorch_int8: str | None
    compressed_onnx: str | None
    compressed_onnx_int8: str | None


class ModelCard(TypedDict):
    architecture: str
    classes: list[str]
    input: CardInput
    output: CardOutput
    files: CardFiles
    models: dict[str, str]  # which model each group of files holds
    bytes: dict[str, int]  # per export made
    verification: dict[str, Any]  # check counts, opset, the int8 gate
    training: dict[str, Any]  # seed, model and train params
    metrics: dict[str, Any]  # best epoch, val acc, each model's test accuracy
    lineage: dict[str, Any] | None  # the hashes dvc.lock recorded for the stages behind the model
    executorch: NotRequired[dict[str, Any]]  # with export.executorch: backend and batch range
    compression: NotRequired[dict[str, Any]]  # when the compress stage pruned: how (training.model.Compression)


def input_side(card: ModelCard) -> int:
    """The side of the square images the exports take."""
    return int(card["input"]["shape"][2])


def load_card(model: Path) -> ModelCard:
    """The model card of an export (beside it, or one folder up for models/int8/ and the like), checked to list
    `model` among its files."""
    card_path = next((folder / "model_card.json" for folder in (model.parent, model.parent.parent)
                      if (folder / "model_card.json").is_file()), model.parent / "model_card.json")
    try:
        card = json.loads(card_path.read_text())
        listed = {name for name in card["files"].values() if name}
        card["classes"] = list(card["classes"])
        input_side(card)  # every reader needs the side: a card without one is not ours
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise ReprotuneError(f"{model}: not a reprotune export (no valid model_card.json beside it)") from None
    relative = model.resolve().relative_to(card_path.parent.resolve()).as_posix()
    if relative not in listed:
        raise ReprotuneError(f"{model}: not a reprotune export ({card_path} lists {', '.join(sorted(listed))})")
    return card
