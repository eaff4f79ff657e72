"""Writers of each serving format: ONNX with a dynamic batch axis, statically quantized int8 ONNX, and
TorchScript. The compress stage writes its ONNX through here too, so nothing else of export is in its
code deps.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from reprotune.data.splits import to_float
from reprotune.inference.runtime import INPUT, OUTPUT
from reprotune.training.model import Classifier


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
    with warnings.catch_warnings(), open(path, "wb") as out:
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices; the trace itself is checked
        # Into an open file: given a path, torch names the archive's folder after it (a temporary name
        # here), and the same model gave different bytes each time (tensorfiles.save_torch).
        torch.jit.save(torch.jit.trace(model, example), out)


class _Calibration(CalibrationDataReader):
    """Feeds ONNX Runtime's static quantizer batches of uint8 training images, each made float as it
    is fed (256 calibration images at 224 px would be 154 MB of floats held at once)."""

    def __init__(self, images: torch.Tensor, batch: int = 32):
        self._batches = (to_float(images[i:i + batch]).numpy() for i in range(0, len(images), batch))

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}


def quantize_int8(fp32: Path, out: Path, calibration: torch.Tensor) -> None:
    """Static int8 quantization (QDQ, per-channel weights) calibrated on `calibration` uint8 images."""
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

