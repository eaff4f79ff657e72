"""Export for serving: ONNX (dynamic batch), int8 ONNX, TorchScript and, with `export.executorch`,
ExecuTorch programs for phones (`phone.py`), each verified before it lands.

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
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from tensorboardX import SummaryWriter

from reprotune.config import ExportConfig
from reprotune.data.cache import CachedImages, batches
from reprotune.data.splits import Split, to_float
from reprotune.errors import ReprotuneError
from reprotune.export import phone
from reprotune.export.formats import export_onnx, export_torchscript, quantize_int8
from reprotune.files import atomic_dir, atomic_file
from reprotune.inference.runtime import Runner, executorch_runner, onnx_runner, torchscript_runner
from reprotune.tracking import tensorboard
from reprotune.training.model import Classifier
from reprotune.training.scoring import batched_logits, float_batch

BATCH = 256  # images per run when measuring accuracy through an export, fewer for large images (float_batch)
# Report keys of the exported files, in the order tables list them (those not made are skipped).
EXPORTS = ("onnx", "onnx_int8", "torchscript", "executorch", "executorch_int8", "compressed", "compressed_int8")
INT8_FILE = "model.int8.onnx"  # inside ExportPaths.int8, when the int8 model passed its gate
INT8_REJECTED = "rejected.json"  # inside ExportPaths.int8, when it did not: the verdict, no model
# Inside ExportPaths.compressed: the pruned model's fp32 and int8 ONNX (the latter when it passed its
# gate, else INT8_REJECTED); when the pruned model missed compress.max_acc_drop, only INT8_REJECTED
# (its name says rejected, not int8) with the compress stage's verdict; when nothing was pruned, only
# NOT_PRUNED saying so.
COMPRESSED_FILE, NOT_PRUNED = "model.onnx", "not_pruned.json"


class Verified(TypedDict):
    """One exported file, checked through its own runtime (`verify`)."""

    max_abs_diff: float  # the largest |logit difference| from its PyTorch model on the check images
    bytes: int
    test_acc: float
    agreement: float  # share of test images where it picks its PyTorch model's class
    latency_ms: float  # batch 1, median, one thread (`latency_ms`): machine-dependent, reviewed apart


class Quantized(Verified):
    """An int8 file, after its gate (`gate_int8`), against the fp32 file it was quantized from."""

    shipped: bool  # agreement >= export.int8_min_agreement
    size_ratio: float
    acc_change: float
    speedup: float  # batch-1 latency, fp32 / int8


class Program(Verified):
    """An fp32 ExecuTorch program: XNNPACK plans its buffers for batches of 1 to `max_batch`."""

    max_batch: int


class PyTorchModel(TypedDict, total=False):
    test_acc: float
    shipped: bool  # the compressed model only: whether it passed compress.max_acc_drop


class Verification(TypedDict):
    check_images: int
    test_images: int
    opset: int


class ExportReport(TypedDict, total=False):
    """What `export_all` found: one entry per file made (their keys in EXPORTS), the PyTorch models'
    accuracy, and the warning line when something was left out. The stage writes it out as
    metrics/export.json (`export_metrics`), the model card and TensorBoard."""

    pytorch: PyTorchModel
    verification: Verification
    onnx: Verified
    torchscript: Verified
    onnx_int8: Quantized
    executorch: Program  # with export.executorch
    executorch_int8: Quantized
    compressed_pytorch: PyTorchModel  # when the compress stage pruned
    compressed: Verified  # ... and its model passed compress.max_acc_drop
    compressed_int8: Quantized
    warning: str  # what was not shipped, and where the verdict is


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
    test_images: torch.Tensor | CachedImages  # the whole test split, uint8, made float a batch at a time
    labels: np.ndarray
    predicted: np.ndarray  # PyTorch's class for each test image

    @classmethod
    def of(cls, model: Classifier, test: Split, cfg: ExportConfig) -> Reference:
        check = to_float(test.images[: cfg.check_images])
        with torch.no_grad():
            logits = model.eval()(check).numpy()
        return cls(check, logits, test.images, test.labels.numpy(),
                   batched_logits(model, test.images, float_batch(test.images, BATCH)).argmax(1).numpy())

    @property
    def test_acc(self) -> float:
        return float((self.predicted == self.labels).mean())


def batched(run: Callable[[np.ndarray], np.ndarray], images: torch.Tensor | CachedImages) -> np.ndarray:
    """Logits for all uint8 `images` (in memory or on disk), a batch at a time, each made float as it is read."""
    n = float_batch(images, BATCH)
    return np.concatenate([run(to_float(batch).numpy()) for batch in batches(images, n)])


# Batch-1 calls before the timed ones. TorchScript's profiling executor profiles the first call and
# optimizes (fuses, compiles kernels) on the next: each of the first two took 40 ms to over a second on
# 2 cores, against 5 ms after; ONNX Runtime and ExecuTorch allocate on the first. One warm-up call left
# TorchScript's median at 527-548 ms in 5 of 6 demo runs.
LATENCY_WARMUP = 5


def median_latency_ms(run: Callable[[np.ndarray], np.ndarray], image: np.ndarray, repeats: int) -> float:
    """Median wall time of one batch-1 call, after LATENCY_WARMUP warm-up calls."""
    for _ in range(LATENCY_WARMUP):
        run(image)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(image)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


@contextlib.contextmanager
def one_torch_thread():
    """torch's intra-op threads set to one for the block. Batch 1 at 32 px is too small to share: with
    two threads on a busy 2-core machine a call waited hundreds of ms for the other thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def latency_ms(load: Callable[[Path], Runner], path: Path, image: np.ndarray, repeats: int) -> float:
    """Batch-1 latency of the exported file at `path` on one CPU thread (ONNX Runtime's and torch's; an
    ExecuTorch program keeps XNNPACK's own threads), through a runner loaded for it alone: no call at
    another batch size has sent TorchScript's profiling executor back to re-specializing."""
    with one_torch_thread():
        run = onnx_runner(path, threads=1) if load is onnx_runner else load(path)
        return median_latency_ms(run, image, repeats)


def verify(load: Callable[[Path], Runner], path: Path, ref: Reference, cfg: ExportConfig) -> Verified:
    """Parity with PyTorch at batch 1 and on the whole check set (which proves the batch axis is
    really dynamic), and accuracy, agreement, size and latency (`latency_ms`) recomputed through the
    file itself, loaded by `load` (`onnx_runner`, `torchscript_runner` or `executorch_runner`)."""
    run = load(path)
    diff = max(np.abs(run(ref.check[:1].numpy()) - ref.logits[:1]).max(),
               np.abs(run(ref.check.numpy()) - ref.logits).max())
    guessed = batched(run, ref.test_images).argmax(1)
    return {"max_abs_diff": float(diff), "bytes": path.stat().st_size,
            "test_acc": float((guessed == ref.labels).mean()), "agreement": float((guessed == ref.predicted).mean()),
            "latency_ms": latency_ms(load, path, ref.check[:1].numpy(), cfg.latency_runs)}


def within_tolerance(entry: Verified, name: str, cfg: ExportConfig) -> None:
    """An fp32 export must match PyTorch: raise (so that nothing is written) when it does not."""
    if not entry["max_abs_diff"] <= cfg.tolerance:
        raise ReprotuneError(f"{name} export differs from PyTorch by {entry['max_abs_diff']:.3g} "
                             f"(> export.tolerance {cfg.tolerance}); nothing was written")


def export_int8(fp32: Path, fp32_entry: Verified, ref: Reference, calibration: torch.Tensor, cfg: ExportConfig,
                folder: Path, name: str) -> tuple[Quantized, str | None]:
    """Quantize `fp32` into `folder`/INT8_FILE and gate it on its agreement with PyTorch: below the
    gate the model is removed and INT8_REJECTED says why (or, with `export.int8` required, nothing is
    written). Returns its report entry and, if it was not shipped, the verdict."""
    int8 = folder / INT8_FILE
    quantize_int8(fp32, int8, calibration[: cfg.calibration_images])
    entry: Quantized = verify(onnx_runner, int8, ref, cfg)  # gate_int8 completes it
    return entry, gate_int8(entry, fp32_entry, int8, cfg, name)


def gate_int8(entry: Quantized, fp32_entry: Verified, int8: Path, cfg: ExportConfig, name: str) -> str | None:
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
                      folder: Path) -> tuple[ExportReport, str | None]:
    """ExecuTorch programs for XNNPACK in `folder`: fp32 (within `export.tolerance`, else raise) and
    int8 (gated like the int8 ONNX model), each run through ExecuTorch's own runtime to verify it.
    Their report entries, and the int8 program's verdict if it was not shipped."""
    fp32 = folder / phone.PTE_FILE
    phone.export_pte(model, ref.check[:2], fp32, cfg.executorch_max_batch)
    entry: Program = {**verify(executorch_runner, fp32, ref, cfg), "max_batch": cfg.executorch_max_batch}
    within_tolerance(entry, "executorch", cfg)
    int8 = folder / phone.PTE_INT8_FILE
    phone.quantize_pte(model, ref.check[:2], int8, to_float(calibration[: cfg.calibration_images]),
                        cfg.executorch_max_batch)
    quantized: Quantized = verify(executorch_runner, int8, ref, cfg)  # gate_int8 completes it
    verdict = gate_int8(quantized, entry, int8, cfg, "int8 ExecuTorch")
    return {"executorch": entry, "executorch_int8": quantized}, verdict


def export_all(model: Classifier, test: Split, calibration: torch.Tensor, cfg: ExportConfig,
               paths: ExportPaths, compressed: Classifier | None = None, compressed_verdict: str | None = None
               ) -> ExportReport:
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
        phone.require_executorch()
    model = model.eval()
    ref = Reference.of(model, test, cfg)
    report: ExportReport = {"pytorch": {"test_acc": ref.test_acc},
              "verification": {"check_images": len(ref.check), "test_images": len(ref.labels), "opset": cfg.opset}}
    with atomic_file(paths.onnx) as onnx_tmp, atomic_file(paths.torchscript) as ts_tmp, \
            atomic_dir(paths.int8) as int8_dir, atomic_dir(paths.compressed) as compressed_dir, \
            atomic_dir(paths.executorch) as pte_dir:
        export_onnx(model, ref.check[:2], onnx_tmp, cfg.opset)
        export_torchscript(model, ref.check[:2], ts_tmp)
        for name, path, runner in (("onnx", onnx_tmp, onnx_runner), ("torchscript", ts_tmp, torchscript_runner)):
            report[name] = verify(runner, path, ref, cfg)
            within_tolerance(report[name], name, cfg)
        report["onnx_int8"], verdict = export_int8(onnx_tmp, report["onnx"], ref, calibration, cfg, int8_dir,
                                                   "int8 ONNX")
        rejected = [(verdict, paths.int8)]
        if cfg.executorch:
            entries, verdict = export_executorch(model, ref, calibration, cfg, pte_dir)
            report.update(entries)
            rejected.append((verdict, paths.executorch))
        else:
            phone.write_off_note(pte_dir)
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
                      folder: Path) -> tuple[ExportReport, str | None]:
    """The pruned model as ONNX and int8 ONNX in `folder`, each verified against the pruned model:
    their report entries, and the int8 model's verdict if it was not shipped."""
    ref = Reference.of(model, test, cfg)
    fp32 = folder / COMPRESSED_FILE
    export_onnx(model, ref.check[:2], fp32, cfg.opset)
    entry = verify(onnx_runner, fp32, ref, cfg)
    within_tolerance(entry, "compressed ONNX", cfg)
    int8, verdict = export_int8(fp32, entry, ref, calibration, cfg, folder, "compressed int8 ONNX")
    return {"compressed_pytorch": {"test_acc": ref.test_acc, "shipped": True}, "compressed": entry,
            "compressed_int8": int8}, verdict


def export_metrics(report: ExportReport) -> dict:
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


def log_export(writer: SummaryWriter, report: ExportReport) -> None:
    """Parity, accuracy, size and latency of each export, as scalars and a table."""
    rows = []
    for name in [name for name in EXPORTS if name in report]:
        entry = report[name]
        for key in ("max_abs_diff", "test_acc", "agreement", "latency_ms"):
            writer.add_scalar(f"export/{name}_{key}", entry[key], 0)
        writer.add_scalar(f"export/{name}_megabytes", entry["bytes"] / 2**20, 0)
        rows.append([name, f"{entry['max_abs_diff']:.3g}", f"{entry['test_acc']:.4f}", f"{entry['agreement']:.4f}",
                     f"{entry['bytes'] / 2**20:.1f}", f"{entry['latency_ms']:.3f}"])
    tensorboard.log_table(writer, "export/summary", ["format", "max abs diff vs PyTorch", "test acc",
                                            "top-1 agreement", "MiB", "batch-1 latency ms"], rows)

