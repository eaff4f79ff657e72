"""What crosses a stage or module boundary has one typed record, and the real outputs match it exactly.

The records are TypedDicts (the files stay plain dicts and JSON: `torch.load(weights_only=True)` and
any JSON reader take them): the saved model, the compress metrics, the export report, the model card
and the drift reference. Each output of a real `dvc repro` (conftest's `exported`: every optional
output on) is checked key by key against its record, nested records included, so a key added,
dropped or renamed in one place and not in its record fails here.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, NotRequired, Union, get_args, get_origin, get_type_hints, is_typeddict

import numpy as np

from reprotune.config import CompressConfig, ExportConfig
from reprotune.data.splits import load_split
from reprotune.evaluation.reference import DriftReference, load_reference
from reprotune.export.compress import CompressMetrics
from reprotune.export.release import ExportPaths, ExportReport, export_all
from reprotune.inference.modelcard import ModelCard
from reprotune.tensorfiles import load_torch
from reprotune.training.model import Compression, SavedModel, load_model


def mismatches(value: Any, kind: Any, where: str = "") -> list[str]:
    """Where `value` does not fit the type `kind`: TypedDicts key by key (exactly their keys), lists,
    dicts, unions, Any and plain classes (an int is a float, as in JSON)."""
    origin = get_origin(kind)
    if kind is Any:
        return []
    if is_typeddict(kind):
        if not isinstance(value, dict):
            return [f"{where}: {type(value).__name__}, not a {kind.__name__}"]
        hints = get_type_hints(kind, include_extras=True)
        # NotRequired under `from __future__ import annotations` is only seen once the hints are resolved
        required = {key for key in kind.__required_keys__ if get_origin(hints[key]) is not NotRequired}
        found = [f"{where}.{key}: missing" for key in required - set(value)]
        found += [f"{where}.{key}: not in {kind.__name__}" for key in set(value) - set(hints)]
        for key in set(value) & set(hints):
            found += mismatches(value[key], hints[key], f"{where}.{key}")
        return found
    if origin in (Union, types.UnionType):
        options = [mismatches(value, option, where) for option in get_args(kind)]
        return [] if any(not o for o in options) else min(options, key=len)
    if origin is NotRequired:
        return mismatches(value, get_args(kind)[0], where)
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {type(value).__name__}, not a list"]
        return [m for i, item in enumerate(value) for m in mismatches(item, get_args(kind)[0], f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: {type(value).__name__}, not a dict"]
        return [m for k, v in value.items() for m in mismatches(v, get_args(kind)[1], f"{where}[{k!r}]")]
    if kind is type(None):
        return [] if value is None else [f"{where}: {value!r}, not None"]
    accepted = (int, float) if kind is float else kind
    if isinstance(value, bool) and kind in (int, float):
        return [f"{where}: {value!r}, not a {kind.__name__}"]
    return [] if isinstance(value, accepted) else [f"{where}: {type(value).__name__}, not a {kind.__name__}"]


class Inner(typing.TypedDict):
    n: int


class Outer(typing.TypedDict):
    name: str
    inner: Inner
    note: NotRequired[str | None]


def test_the_checker_sees_a_missing_an_extra_and_a_mistyped_key():
    assert mismatches({"name": "a", "inner": {"n": 1}, "note": None}, Outer) == []
    assert mismatches({"name": "a", "inner": {"n": 1.5}}, Outer) == [".inner.n: float, not a int"]
    assert mismatches({"name": "a", "inner": {"n": 1, "m": 2}}, Outer) == [".inner.m: not in Inner"]
    assert mismatches({"inner": {"n": 1}}, Outer) == [".name: missing"]


def test_the_saved_models_are_their_record(exported):
    root, _ = exported
    for path in ("models/model.pt", "models/model.compressed.pt"):
        saved = load_torch(root / path, "model")
        assert mismatches(saved, SavedModel) == [], path
    assert "compression" in load_torch(root / "models/model.compressed.pt", "model")


def test_the_compression_record_holds_every_compress_param():
    assert set(get_type_hints(Compression)) == set(CompressConfig.model_fields) | {"flops_ratio", "accepted",
                                                                                   "verdict"}


def test_compress_metrics_and_the_model_card_are_their_records(exported):
    root, _ = exported
    metrics = json.loads((root / "metrics/compress.json").read_text())
    assert mismatches(metrics, CompressMetrics) == []
    card = json.loads((root / "models/model_card.json").read_text())
    assert mismatches(card, ModelCard) == []
    assert {"executorch", "compression"} <= set(card)  # the optional parts, present here, checked too


def test_the_drift_reference_is_its_record(exported):
    root, _ = exported
    reference = load_reference(root / "models/reference.pt", root / "models/model.pt")
    assert mismatches(reference, DriftReference) == []
    assert isinstance(reference["stats"], np.ndarray)


def test_the_export_report_is_its_record(exported, tmp_path):
    root, _ = exported
    model, _ = load_model(root / "models/model.pt")
    compressed, _ = load_model(root / "models/model.compressed.pt")
    test = load_split(root / "data/processed/test.pt")
    test.images, test.labels = test.images[:64], test.labels[:64]
    paths = ExportPaths(*(tmp_path / name for name in ("model.onnx", "int8", "model.ts", "compressed", "pte")))
    cfg = ExportConfig(check_images=8, calibration_images=16, latency_runs=1, int8_min_agreement=0.0)
    report = export_all(model, test, test.images, cfg, paths, compressed)
    assert mismatches(report, ExportReport) == []
    assert {"onnx", "torchscript", "onnx_int8", "compressed", "compressed_int8"} <= set(report)

