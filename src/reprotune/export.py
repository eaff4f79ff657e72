"""Export for serving: ONNX (dynamic batch), int8 ONNX, TorchScript and, with `export.executorch`,
ExecuTorch programs for phones (`mobile.py`), each verified before it lands.

All exports carry the `Classifier`'s normalization and resize, so a consumer feeds float32 RGB
images in [0, 1] (N, 3, S, S) and gets logits, S being the side of the cached images the model was
trained on (`input_size`: 32 for CIFAR). The fp32 exports must match PyTorch within
`export.tolerance` on real test images; the int8 model must agree with PyTorch's top-1 class on at
least `export.int8_min_agreement` of the test set. Each one's test accuracy is recomputed through
the exported file itself. Nothing is renamed into place unless every check passes. The compress
stage's model is exported only if it passed its own gate (`compress.max_acc_drop`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from tensorboardX import SummaryWriter

from reprotune import mobile, tb
from reprotune.config import CIFAR_SIDE, ExportConfig
from reprotune.data import Split, to_float
from reprotune.errors import ReprotuneError
from reprotune.evaluate import predict
from reprotune.io import atomic_dir, atomic_file, file_md5
from reprotune.model import Classifier
from reprotune.runtime import INPUT, OUTPUT, Runner, executorch_runner, onnx_runner, torchscript_runner

BATCH = 256  # images per run when measuring accuracy through an export
# Report keys of the exported files, in the order tables list them (those not made are skipped).
EXPORTS = ("onnx", "onnx_int8", "torchscript", "executorch", "executorch_int8", "compressed", "compressed_int8")


INT8_FILE = "model.int8.onnx"  # inside ExportPaths.int8, when the int8 model passed its gate
INT8_REJECTED = "rejected.json"  # inside ExportPaths.int8, when it did not: the verdict, no model
# Inside ExportPaths.compressed: the pruned model's fp32 and int8 ONNX (the latter when it passed its
# gate, else INT8_REJECTED); when the pruned model missed compress.max_acc_drop, only INT8_REJECTED
# (its name says rejected, not int8) with the compress stage's verdict; when nothing was pruned, only
# NOT_PRUNED saying so.
COMPRESSED_FILE, NOT_PRUNED = "model.onnx", "not_pruned.json"


@dataclass
class ExportPaths:
    onnx: Path
    int8: Path  # a directory: DVC needs every declared output to exist, and the int8 model may not
    torchscript: Path
    compressed: Path  # a directory, for the same reason: the compress stage may have pruned nothing
    executorch: Path  # a directory: the .pte programs, or a note that export.executorch is off


@dataclass
class Reference:
    """What every export of one model is checked against: PyTorch's logits and predictions."""

    check: torch.Tensor  # the first export.check_images test images, float
    logits: np.ndarray  # PyTorch's logits on them
    test_images: np.ndarray  # the whole test split, float
    labels: np.ndarray
    predicted: np.ndarray  # PyTorch's class for each test image

    @classmethod
    def of(cls, model: Classifier, test: Split, cfg: ExportConfig) -> Reference:
        check = to_float(test.images[: cfg.check_images])
        with torch.no_grad():
            logits = model.eval()(check).numpy()
        return cls(check, logits, to_float(test.images).numpy(), test.labels.numpy(),
                   predict(model, test.images, BATCH).argmax(1).numpy())

    @property
    def test_acc(self) -> float:
        return float((self.predicted == self.labels).mean())


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


def verify(run: Runner, path: Path, ref: Reference, cfg: ExportConfig) -> dict:
    """Parity with PyTorch at batch 1 and on the whole check set (which proves the batch axis is
    really dynamic), and accuracy, agreement, size and latency recomputed through the file itself."""
    diff = max(np.abs(run(ref.check[:1].numpy()) - ref.logits[:1]).max(),
               np.abs(run(ref.check.numpy()) - ref.logits).max())
    guessed = batched(run, ref.test_images).argmax(1)
    return {"max_abs_diff": float(diff), "bytes": path.stat().st_size,
            "test_acc": float((guessed == ref.labels).mean()), "agreement": float((guessed == ref.predicted).mean()),
            "latency_ms": median_latency_ms(run, ref.test_images[:1], cfg.latency_runs)}


def within_tolerance(entry: dict, name: str, cfg: ExportConfig) -> None:
    """An fp32 export must match PyTorch: raise (so that nothing is written) when it does not."""
    if not entry["max_abs_diff"] <= cfg.tolerance:
        raise ReprotuneError(f"{name} export differs from PyTorch by {entry['max_abs_diff']:.3g} "
                             f"(> export.tolerance {cfg.tolerance}); nothing was written")


def export_int8(fp32: Path, fp32_entry: dict, ref: Reference, calibration: torch.Tensor, cfg: ExportConfig,
                folder: Path, name: str) -> tuple[dict, str | None]:
    """Quantize `fp32` into `folder`/INT8_FILE and gate it on its agreement with PyTorch: below the
    gate the model is removed and INT8_REJECTED says why (or, with `export.int8` required, nothing is
    written). Returns its report entry and, if it was not shipped, the verdict."""
    int8 = folder / INT8_FILE
    quantize_int8(fp32, int8, to_float(calibration[: cfg.calibration_images]).numpy())
    entry = verify(onnx_runner(int8), int8, ref, cfg)
    return entry, gate_int8(entry, fp32_entry, int8, cfg, name)


def gate_int8(entry: dict, fp32_entry: dict, int8: Path, cfg: ExportConfig, name: str) -> str | None:
    """Ship the int8 file `int8` (its `entry` from `verify`) only if it agrees with PyTorch often
    enough: else remove it and leave INT8_REJECTED beside it saying why, or, with `export.int8`
    required, raise. Completes `entry` (shipped, and size, accuracy and speed against `fp32_entry`)
    and returns the verdict when it was not shipped."""
    verdict = None
    entry["shipped"] = entry["agreement"] >= cfg.int8_min_agreement
    if not entry["shipped"]:
        verdict = (f"{name} model agrees with PyTorch on {entry['agreement']:.3f} of test images "
                   f"(< export.int8_min_agreement {cfg.int8_min_agreement})")
        if cfg.int8 == "required":
            raise ReprotuneError(f"{verdict}; export.int8 is required, so nothing was written")
        int8.unlink()
        (int8.parent / INT8_REJECTED).write_text(json.dumps({"verdict": verdict, **entry}, indent=2) + "\n")
    entry["size_ratio"] = entry["bytes"] / fp32_entry["bytes"]
    entry["acc_change"] = entry["test_acc"] - fp32_entry["test_acc"]
    entry["speedup"] = fp32_entry["latency_ms"] / entry["latency_ms"]
    return verdict


def export_executorch(model: Classifier, ref: Reference, calibration: torch.Tensor, cfg: ExportConfig,
                      folder: Path) -> tuple[dict, str | None]:
    """ExecuTorch programs for XNNPACK in `folder`: fp32 (within `export.tolerance`, else raise) and
    int8 (gated like the int8 ONNX model), each run through ExecuTorch's own runtime to verify it.
    Their report entries, and the int8 program's verdict if it was not shipped."""
    fp32 = folder / mobile.PTE_FILE
    mobile.export_pte(model, ref.check[:2], fp32, cfg.executorch_max_batch)
    entry = {**verify(executorch_runner(fp32), fp32, ref, cfg), "max_batch": cfg.executorch_max_batch}
    within_tolerance(entry, "executorch", cfg)
    int8 = folder / mobile.PTE_INT8_FILE
    mobile.quantize_pte(model, ref.check[:2], int8, to_float(calibration[: cfg.calibration_images]),
                        cfg.executorch_max_batch)
    quantized = verify(executorch_runner(int8), int8, ref, cfg)
    verdict = gate_int8(quantized, entry, int8, cfg, "int8 ExecuTorch")
    return {"executorch": entry, "executorch_int8": quantized}, verdict


def export_all(model: Classifier, test: Split, calibration: torch.Tensor, cfg: ExportConfig,
               paths: ExportPaths, compressed: Classifier | None = None, compressed_verdict: str | None = None
               ) -> dict:
    """Export every format, verify each against PyTorch and on the test set, rename what passed into place.

    The fp32 exports must pass (else nothing is written). An int8 model that misses its agreement
    gate is not shipped: unless `export.int8` is `required`, the stage still succeeds, its folder
    holds only the verdict, and the report says why. With `export.executorch`, the ExecuTorch programs
    go to `paths.executorch` the same way. `compressed`: the compress stage's pruned model,
    exported to ONNX and int8 ONNX in `paths.compressed` and checked against itself the same way
    (None: nothing was pruned). `compressed_verdict`: why the compress stage's gate rejected it: then
    it is left out like an int8 model below its gate, `paths.compressed` holding only the verdict.
    """
    if cfg.executorch:  # before any work: without the mobile extra, say so at once
        mobile.require_executorch()
    model = model.eval()
    ref = Reference.of(model, test, cfg)
    report = {"pytorch": {"test_acc": ref.test_acc},
              "verification": {"check_images": len(ref.check), "test_images": len(ref.labels), "opset": cfg.opset}}
    with atomic_file(paths.onnx) as onnx_tmp, atomic_file(paths.torchscript) as ts_tmp, \
            atomic_dir(paths.int8) as int8_dir, atomic_dir(paths.compressed) as compressed_dir, \
            atomic_dir(paths.executorch) as pte_dir:
        export_onnx(model, ref.check[:2], onnx_tmp, cfg.opset)
        export_torchscript(model, ref.check[:2], ts_tmp)
        for name, path, runner in (("onnx", onnx_tmp, onnx_runner), ("torchscript", ts_tmp, torchscript_runner)):
            report[name] = verify(runner(path), path, ref, cfg)
            within_tolerance(report[name], name, cfg)
        report["onnx_int8"], verdict = export_int8(onnx_tmp, report["onnx"], ref, calibration, cfg, int8_dir,
                                                   "int8 ONNX")
        rejected = [(verdict, paths.int8)]
        if cfg.executorch:
            entries, verdict = export_executorch(model, ref, calibration, cfg, pte_dir)
            report.update(entries)
            rejected.append((verdict, paths.executorch))
        else:
            mobile.write_off_note(pte_dir)
        if compressed is None:
            (compressed_dir / NOT_PRUNED).write_text(json.dumps(
                {"verdict": "compress.ratio is 0: models/model.compressed.pt is the fine-tuned model itself"}) + "\n")
        elif compressed_verdict:
            report["compressed_pytorch"] = {"test_acc": Reference.of(compressed.eval(), test, cfg).test_acc,
                                            "shipped": False}
            (compressed_dir / INT8_REJECTED).write_text(json.dumps(
                {"verdict": compressed_verdict, "test_acc": report["compressed_pytorch"]["test_acc"],
                 "unpruned_test_acc": ref.test_acc}, indent=2) + "\n")
            rejected.append((compressed_verdict, paths.compressed))
        else:
            entries, verdict = export_compressed(compressed.eval(), test, calibration, cfg, compressed_dir)
            report.update(entries)
            rejected.append((verdict, paths.compressed))
    notes = [f"{verdict}: not shipped ({folder / INT8_REJECTED} says why)" for verdict, folder in rejected if verdict]
    if notes:
        report["warning"] = "; ".join(notes)
    return report


def export_compressed(model: Classifier, test: Split, calibration: torch.Tensor, cfg: ExportConfig,
                      folder: Path) -> tuple[dict, str | None]:
    """The pruned model as ONNX and int8 ONNX in `folder`, each verified against the pruned model:
    their report entries, and the int8 model's verdict if it was not shipped."""
    ref = Reference.of(model, test, cfg)
    fp32 = folder / COMPRESSED_FILE
    export_onnx(model, ref.check[:2], fp32, cfg.opset)
    entry = verify(onnx_runner(fp32), fp32, ref, cfg)
    within_tolerance(entry, "compressed ONNX", cfg)
    int8, verdict = export_int8(fp32, entry, ref, calibration, cfg, folder, "compressed int8 ONNX")
    return {"compressed_pytorch": {"test_acc": ref.test_acc, "shipped": True}, "compressed": entry,
            "compressed_int8": int8}, verdict


def export_metrics(report: dict) -> dict:
    """What `metrics/export.json` holds: numbers about the exports' quality and speed (file sizes and
    check counts go to the model card), parity and int8 agreement first, a reviewer's headline."""
    fp32 = ("max_abs_diff", "test_acc", "agreement", "latency_ms")
    int8 = ("agreement", "shipped", "test_acc", "acc_change", "size_ratio", "speedup", "max_abs_diff", "latency_ms")
    fp32_names = [name for name in ("onnx", "torchscript", "executorch", "compressed") if name in report]
    int8_names = [name for name in ("onnx_int8", "executorch_int8", "compressed_int8") if name in report]
    # The headline, short enough for `dvc exp show` at 120 columns: the worst |logit difference| of
    # any fp32 export against its PyTorch model, and the share of test images where int8 picks PyTorch's class.
    # `compressed_shipped`: whether the pruned model passed compress.max_acc_drop (absent: none pruned).
    shipped = {"compressed_shipped": report["compressed_pytorch"]["shipped"]} if "compressed_pytorch" in report else {}
    return {"parity": max(report[name]["max_abs_diff"] for name in fp32_names),
            "int8_agree": report["onnx_int8"]["agreement"], **shipped,
            **{name: {k: report[name][k] for k in fp32} for name in fp32_names},
            **{name: {k: report[name][k] for k in int8} for name in int8_names}}


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


def model_card(saved: dict, report: dict, trace: dict | None, compressed: dict | None = None) -> dict:
    """What a consumer needs to feed the exported models, which model each file holds, how well they
    do, and where they came from. `compressed`: the compress stage's saved model, when it pruned one."""
    side = saved.get("input_size", CIFAR_SIDE)  # models saved before folder datasets: CIFAR's 32
    shipped = {name: name in report and report[name]["shipped"]
               for name in ("onnx_int8", "executorch_int8", "compressed_int8")}
    compressed_shipped = "compressed" in report  # pruned, and through compress.max_acc_drop
    card = {
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
                  "executorch": f"executorch/{mobile.PTE_FILE}" if "executorch" in report else None,
                  "executorch_int8": f"executorch/{mobile.PTE_INT8_FILE}" if shipped["executorch_int8"] else None,
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


def _compressed_model(saved: dict | None, shipped: bool) -> str:
    """What the model card says the compressed files hold, or why there are none."""
    if not saved:
        return "none: compress.ratio is 0"
    c = saved["compression"]
    if not shipped:
        return f"none: models/model.compressed.pt was not shipped ({c.get('verdict')})"
    return (f"models/model.compressed.pt: the fine-tuned model with {c['ratio']:.0%} of its channels pruned "
            f"({c['flops_ratio']:.2f}x the FLOPs), then fine-tuned again")


def log_export(writer: SummaryWriter, report: dict) -> None:
    """Parity, accuracy, size and latency of each export, as scalars and a table."""
    rows = []
    for name in [name for name in EXPORTS if name in report]:
        entry = report[name]
        for key in ("max_abs_diff", "test_acc", "agreement", "latency_ms"):
            writer.add_scalar(f"export/{name}_{key}", entry[key], 0)
        writer.add_scalar(f"export/{name}_megabytes", entry["bytes"] / 2**20, 0)
        rows.append([name, f"{entry['max_abs_diff']:.3g}", f"{entry['test_acc']:.4f}", f"{entry['agreement']:.4f}",
                     f"{entry['bytes'] / 2**20:.1f}", f"{entry['latency_ms']:.3f}"])
    tb.log_table(writer, "export/summary", ["format", "max abs diff vs PyTorch", "test acc",
                                            "top-1 agreement", "MiB", "batch-1 latency ms"], rows)
