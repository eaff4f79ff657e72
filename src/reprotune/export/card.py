"""The model card: what a consumer needs to feed the exported models, which model each file holds, how
well they do, and where they came from (the hashes DVC recorded for the stages behind the model).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from reprotune.config import CIFAR_SIDE
from reprotune.export import phone
from reprotune.export.release import COMPRESSED_FILE, EXPORTS, INT8_FILE, ExportReport
from reprotune.files import file_md5
from reprotune.inference.modelcard import ModelCard
from reprotune.inference.runtime import INPUT, OUTPUT
from reprotune.training.model import SavedModel


def lineage(lock: Path, model_file: Path) -> dict | None:
    """The data, params and model hashes DVC recorded for the stages this model came from."""
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    if "finetune" not in stages:
        return None
    recorded = {}
    for stage in ("download", "preprocess", "finetune"):
        entry = stages.get(stage, {})
        recorded[stage] = {
            "deps": {d["path"]: d["md5"] for d in entry.get("deps", [])},
            "outs": {o["path"]: o["md5"] for o in entry.get("outs", [])},
            "params": entry.get("params", {}).get("params.yaml", {}),
        }
    model_md5 = file_md5(model_file)
    return {"source": str(lock), "stages": recorded, "model_md5": model_md5,
            "model_matches_lock": recorded["finetune"]["outs"].get(str(model_file)) == model_md5}


def model_card(saved: SavedModel, report: ExportReport, trace: dict | None,
               compressed: SavedModel | None = None) -> ModelCard:
    """What a consumer needs to feed the exported models, which model each file holds, how well they
    do, and where they came from. `compressed`: the compress stage's saved model, when it pruned one."""
    side = saved.get("input_size", CIFAR_SIDE)  # models saved before folder datasets: CIFAR's 32
    shipped = {name: name in report and report[name]["shipped"]
               for name in ("onnx_int8", "executorch_int8", "compressed_int8")}
    compressed_shipped = "compressed" in report  # pruned, and through compress.max_acc_drop
    card: ModelCard = {
        "architecture": saved["model"]["arch"],
        "classes": saved["classes"],
        "input": {
            "name": INPUT, "layout": "NCHW", "dtype": "float32", "channels": "RGB",
            "shape": ["batch", 3, side, side], "value_range": [0.0, 1.0],
            "normalization": "inside the model: (x - mean) / std per channel",
            "mean": saved["mean"], "std": saved["std"],
            "resize": f"inside the model, bilinear to {saved['model']['image_size']}x"
                      f"{saved['model']['image_size']}",
        },
        "output": {"name": OUTPUT, "shape": ["batch", len(saved["classes"])],
                   "meaning": "unnormalized logits; softmax gives class probabilities"},
        # Paths relative to this card; an int8 model only when it passed its gate, the compressed ones
        # only when the compress stage pruned (compress.ratio > 0) and its model passed compress.max_acc_drop.
        # All take the same input.
        "files": {"onnx": "model.onnx", "torchscript": "model.torchscript.pt",
                  "onnx_int8": f"int8/{INT8_FILE}" if shipped["onnx_int8"] else None,
                  "executorch": f"executorch/{phone.PTE_FILE}" if "executorch" in report else None,
                  "executorch_int8": f"executorch/{phone.PTE_INT8_FILE}" if shipped["executorch_int8"] else None,
                  "compressed_onnx": f"compressed/{COMPRESSED_FILE}" if compressed_shipped else None,
                  "compressed_onnx_int8": f"compressed/{INT8_FILE}" if shipped["compressed_int8"] else None},
        "models": {
            "onnx, torchscript, onnx_int8, executorch, executorch_int8":
                "the fine-tuned model, models/model.pt (int8: quantized from it)",
            "compressed_onnx, compressed_onnx_int8": _compressed_model(compressed, compressed_shipped)},
        "bytes": {name: report[name]["bytes"] for name in EXPORTS if name in report},
        "verification": {**report["verification"], "int8_shipped": report["onnx_int8"]["shipped"],
                         "int8_agreement": report["onnx_int8"]["agreement"]},
        "training": {"seed": saved.get("seed"), "model": saved["model"], "train": saved.get("train")},
        "metrics": {"best_epoch": saved.get("best_epoch"), "val_acc": saved.get("val_acc"),
                    **{f"{name}_test_acc": report[name]["test_acc"]
                       for name in ("pytorch", "compressed_pytorch", *EXPORTS) if name in report}},
        "lineage": trace,
    }
    if "executorch" in report:  # ExecuTorch plans its buffers for one largest batch: 1..max images per call
        card["executorch"] = {"backend": "XNNPACK", "batch": {"min": 1, "max": report["executorch"]["max_batch"]}}
    if compressed:
        card["compression"] = compressed["compression"]
    return card


def _compressed_model(saved: SavedModel | None, shipped: bool) -> str:
    """What the model card says the compressed files hold, or why there are none."""
    if not saved:
        return "none: compress.ratio is 0"
    c = saved["compression"]
    if not shipped:
        return f"none: models/model.compressed.pt was not shipped ({c.get('verdict')})"
    return (f"models/model.compressed.pt: the fine-tuned model with {c['ratio']:.0%} of its channels pruned "
            f"({c['flops_ratio']:.2f}x the FLOPs), then fine-tuned again")

