"""Export for serving: ONNX (dynamic batch), int8 ONNX and TorchScript, each verified before it lands.

All exports carry the `Classifier`'s normalization and resize, so a consumer feeds float32 RGB
images in [0, 1] (N, 3, 32, 32) and gets logits. The fp32 exports must match PyTorch within
`export.tolerance` on real test images; the int8 model must agree with PyTorch's top-1 class on at
least `export.int8_min_agreement` of the test set. Each one's test accuracy is recomputed through
the exported file itself. Nothing is renamed into place unless every check passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import yaml
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from tensorboardX import SummaryWriter

from reprotune import tb
from reprotune.config import ExportConfig
from reprotune.data import Split, to_float
from reprotune.errors import ReprotuneError
from reprotune.evaluate import predict
from reprotune.io import atomic_file
from reprotune.model import Classifier

INPUT, OUTPUT = "image", "logits"
BATCH = 256  # images per run when measuring accuracy through an export


@dataclass
class ExportPaths:
    onnx: Path
    int8: Path
    torchscript: Path


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


class _Calibration(CalibrationDataReader):
    """Feeds ONNX Runtime's static quantizer batches of training images."""

    def __init__(self, images: np.ndarray, batch: int = 32):
        self._batches = iter([{INPUT: images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def quantize_int8(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """Static int8 quantization (QDQ, per-channel weights) calibrated on `calibration` images."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _quiet("root"):
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)


@contextlib.contextmanager
def _quiet(logger: str):
    """Silence a chatty library logger for the duration of the block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """float32 images (N, 3, 32, 32) -> logits, through ONNX Runtime on the CPU."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run([OUTPUT], {INPUT: images})[0]


def torchscript_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """float32 images (N, 3, 32, 32) -> logits, through a TorchScript module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu")

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(images)).numpy()

    return run


def batched(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """Logits for all `images`, BATCH at a time."""
    return np.concatenate([run(images[i:i + BATCH]) for i in range(0, len(images), BATCH)])


def median_latency_ms(run: Callable[[np.ndarray], np.ndarray], image: np.ndarray, repeats: int) -> float:
    """Median wall time of one batch-1 call, after one warm-up call."""
    run(image)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(image)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def export_all(model: Classifier, test: Split, calibration: torch.Tensor, cfg: ExportConfig,
               paths: ExportPaths) -> dict:
    """Export every format, verify each against PyTorch and on the test set, then rename into place."""
    model = model.eval()
    check = to_float(test.images[: cfg.check_images])
    test_images, labels = to_float(test.images).numpy(), test.labels.numpy()
    with torch.no_grad():
        reference = model(check).numpy()
    predicted = predict(model, test.images, BATCH).argmax(1).numpy()
    report = {"check_images": len(check), "test_images": len(labels),
              "pytorch": {"test_acc": float((predicted == labels).mean())}}
    with atomic_file(paths.onnx) as onnx_tmp, atomic_file(paths.torchscript) as ts_tmp, \
            atomic_file(paths.int8) as int8_tmp:
        export_onnx(model, check[:2], onnx_tmp, cfg.opset)
        export_torchscript(model, check[:2], ts_tmp)
        quantize_int8(onnx_tmp, int8_tmp, to_float(calibration[: cfg.calibration_images]).numpy())
        files = {"onnx": onnx_tmp, "torchscript": ts_tmp, "onnx_int8": int8_tmp}
        for name, path in files.items():
            run = torchscript_runner(path) if name == "torchscript" else onnx_runner(path)
            # Batch 1 and the whole check set: proves the batch axis is really dynamic.
            diff = max(np.abs(run(check[:1].numpy()) - reference[:1]).max(),
                       np.abs(run(check.numpy()) - reference).max())
            guessed = batched(run, test_images).argmax(1)
            entry = {"max_abs_diff": float(diff), "bytes": path.stat().st_size,
                     "test_acc": float((guessed == labels).mean()),
                     "agreement": float((guessed == predicted).mean()),
                     "latency_ms": median_latency_ms(run, test_images[:1], cfg.latency_runs)}
            _verify(name, entry, cfg)
            report[name] = entry
    report["onnx"]["opset"] = cfg.opset
    report["onnx_int8"]["size_ratio"] = report["onnx_int8"]["bytes"] / report["onnx"]["bytes"]
    report["onnx_int8"]["acc_change"] = report["onnx_int8"]["test_acc"] - report["onnx"]["test_acc"]
    report["onnx_int8"]["speedup"] = report["onnx"]["latency_ms"] / report["onnx_int8"]["latency_ms"]
    return report


def _verify(name: str, entry: dict, cfg: ExportConfig) -> None:
    if name == "onnx_int8":
        if not entry["agreement"] >= cfg.int8_min_agreement:
            raise ReprotuneError(f"int8 ONNX model agrees with PyTorch on {entry['agreement']:.3f} of test "
                                 f"images (< export.int8_min_agreement {cfg.int8_min_agreement}); nothing was written")
    elif not entry["max_abs_diff"] <= cfg.tolerance:
        raise ReprotuneError(f"{name} export differs from PyTorch by {entry['max_abs_diff']:.3g} "
                             f"(> export.tolerance {cfg.tolerance}); nothing was written")


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
    with model_file.open("rb") as f:
        model_md5 = hashlib.file_digest(f, "md5").hexdigest()
    return {"source": str(lock), "stages": recorded, "model_md5": model_md5,
            "model_matches_lock": recorded["finetune"]["outs"].get(str(model_file)) == model_md5}


def model_card(saved: dict, report: dict, trace: dict | None) -> dict:
    """What a consumer needs to feed the exported models, how well they do, and where they came from."""
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
        "files": {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx", "torchscript": "model.torchscript.pt"},
        "training": {"seed": saved.get("seed"), "model": saved["model"], "train": saved.get("train")},
        "metrics": {"best_epoch": saved.get("best_epoch"), "val_acc": saved.get("val_acc"),
                    **{f"{name}_test_acc": report[name]["test_acc"]
                       for name in ("pytorch", "onnx", "onnx_int8", "torchscript")}},
        "lineage": trace,
    }


def log_export(writer: SummaryWriter, report: dict) -> None:
    """Parity, accuracy, size and latency of each export, as scalars and a table."""
    rows = []
    for name in ("onnx", "onnx_int8", "torchscript"):
        entry = report[name]
        for key in ("max_abs_diff", "test_acc", "agreement", "latency_ms"):
            writer.add_scalar(f"export/{name}_{key}", entry[key], 0)
        writer.add_scalar(f"export/{name}_megabytes", entry["bytes"] / 2**20, 0)
        rows.append([name, f"{entry['max_abs_diff']:.3g}", f"{entry['test_acc']:.4f}", f"{entry['agreement']:.4f}",
                     f"{entry['bytes'] / 2**20:.1f}", f"{entry['latency_ms']:.3f}"])
    tb.log_table(writer, "export/summary", ["format", "max abs diff vs PyTorch", "test acc",
                                            "top-1 agreement", "MiB", "batch-1 latency ms"], rows)
