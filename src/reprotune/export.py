"""Export for serving: ONNX (dynamic batch) and TorchScript, each checked against PyTorch.

Both exports carry the `Classifier`'s normalization and resize, so a consumer feeds float32
RGB images in [0, 1] (N, 3, 32, 32) and gets logits. An export that disagrees with the PyTorch
model by more than `export.tolerance` fails the stage and is never renamed into place.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tensorboardX import SummaryWriter

from reprotune import tb
from reprotune.config import ExportConfig
from reprotune.data import to_float
from reprotune.errors import ReprotuneError
from reprotune.io import atomic_file
from reprotune.model import Classifier

INPUT, OUTPUT = "image", "logits"


def export_onnx(model: Classifier, example: torch.Tensor, path: Path, opset: int) -> None:
    """Write an ONNX model with a dynamic batch axis (torch.export-based exporter, one file)."""
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter narrates each step; failures still raise
        torch.onnx.export(model, (example,), path, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_shapes={"images": {0: batch}}, opset_version=opset,
                          external_data=False, dynamo=True)


def export_torchscript(model: Classifier, example: torch.Tensor, path: Path) -> None:
    """Write a traced TorchScript module (shapes other than the batch are fixed by the trace)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice; the trace itself is checked
        torch.jit.save(torch.jit.trace(model, example), path)


def onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """Run an exported ONNX model with ONNX Runtime on the CPU."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: images})[0]


def torchscript_logits(path: Path, images: torch.Tensor) -> torch.Tensor:
    """Run an exported TorchScript model."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location="cpu")(images)


def export_all(model: Classifier, images: torch.Tensor, cfg: ExportConfig, onnx_path: Path,
               torchscript_path: Path) -> dict:
    """Export both formats, check each on `images` (uint8) at batch 1 and the whole check batch,
    and rename them into place only if both agree with PyTorch within `cfg.tolerance`."""
    model = model.eval()
    x = to_float(images[: cfg.check_images])
    with torch.no_grad():
        reference = model(x)
    report = {"check_images": len(x)}
    with atomic_file(onnx_path) as onnx_tmp, atomic_file(torchscript_path) as ts_tmp:
        export_onnx(model, x[:2], onnx_tmp, cfg.opset)
        export_torchscript(model, x[:2], ts_tmp)
        runners = {
            "onnx": (onnx_tmp, lambda batch: torch.from_numpy(onnx_logits(onnx_tmp, batch.numpy()))),
            "torchscript": (ts_tmp, lambda batch: torchscript_logits(ts_tmp, batch)),
        }
        for name, (path, run) in runners.items():
            # Batch 1 and the whole check set: proves the batch axis is really dynamic.
            diff = max((run(x[:1]) - reference[:1]).abs().max().item(),
                       (run(x) - reference).abs().max().item())
            if not diff <= cfg.tolerance:
                raise ReprotuneError(f"{name} export differs from PyTorch by {diff:.3g} "
                                     f"(> export.tolerance {cfg.tolerance}); nothing was written")
            report[name] = {"max_abs_diff": diff, "bytes": path.stat().st_size,
                            "batch_sizes_checked": [1, len(x)]}
    report["onnx"]["opset"] = cfg.opset
    return report


def model_card(saved: dict, report: dict) -> dict:
    """What a consumer needs to feed the exported models, and where they came from."""
    return {
        "architecture": saved["model"]["arch"],
        "classes": saved["classes"],
        "input": {
            "name": INPUT, "layout": "NCHW", "dtype": "float32", "channels": "RGB",
            "shape": ["batch", 3, 32, 32], "value_range": [0.0, 1.0],
            "normalization": "inside the model: (x - mean) / std per channel",
            "mean": saved["mean"], "std": saved["std"],
            "resize": f"inside the model, bilinear to {saved['model']['image_size']}x"
                      f"{saved['model']['image_size']}",
        },
        "output": {"name": OUTPUT, "shape": ["batch", len(saved["classes"])],
                   "meaning": "unnormalized logits; softmax gives class probabilities"},
        "files": {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"},
        "model": saved["model"],
        "best_epoch": saved.get("best_epoch"),
        "val_acc": saved.get("val_acc"),
        "parity": {name: report[name]["max_abs_diff"] for name in ("onnx", "torchscript")},
    }


def log_export(writer: SummaryWriter, report: dict) -> None:
    """The parity figures and file sizes, as scalars and a table."""
    rows = []
    for name in ("onnx", "torchscript"):
        writer.add_scalar(f"export/{name}_max_abs_diff", report[name]["max_abs_diff"], 0)
        writer.add_scalar(f"export/{name}_megabytes", report[name]["bytes"] / 2**20, 0)
        rows.append([name, f"{report[name]['max_abs_diff']:.3g}", report[name]["bytes"],
                     ", ".join(map(str, report[name]["batch_sizes_checked"]))])
    tb.log_table(writer, "export/parity", ["format", "max abs diff vs PyTorch", "bytes", "batch sizes"], rows)
