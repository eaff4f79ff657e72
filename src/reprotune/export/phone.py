"""On-device export: ExecuTorch programs (.pte) lowered to XNNPACK, fp32 and int8, for phones.

PyTorch's own on-device runtime runs a `.pte` file: the `Classifier` (normalization and resize
inside) captured by torch.export, lowered to the XNNPACK backend, with a batch axis from 1 to
`export.executorch_max_batch` (ExecuTorch plans its buffers for the largest batch). The int8
program is quantized with PT2E (XNNPACK's symmetric per-channel scheme, calibrated on training
images). ExecuTorch is the optional `mobile` extra: it is imported only when the export runs.
release.py verifies and gates these programs like every other export.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch

from reprotune.errors import ReprotuneError
from reprotune.training.model import Classifier

PTE_FILE = "model.pte"  # inside ExportPaths.executorch, when export.executorch is on
PTE_INT8_FILE = "model.int8.pte"  # beside it, when the int8 program passed its gate
PTE_OFF = "disabled.txt"  # the whole directory when export.executorch is off (DVC needs the output)
OFF_NOTE = ("ExecuTorch export is off (export.executorch: false in params.yaml). Set it to true, with the "
            "`mobile` extra installed, to find model.pte and model.int8.pte here.\n")
INSTALL = "pip install -c constraints.txt -e '.[mobile]'"
CALIBRATION_BATCH = 32  # images per calibration forward pass, as for the int8 ONNX model


def _capture(model: torch.nn.Module, example: torch.Tensor, max_batch: int) -> torch.export.ExportedProgram:
    """`model` captured by torch.export with a batch axis of 1..max_batch (a fixed batch of 1 when
    max_batch is 1)."""
    if max_batch == 1:
        return torch.export.export(model, (example[:1],))
    axis = {"images": {0: torch.export.Dim("batch", min=1, max=max_batch)}}
    return torch.export.export(model, (example,), dynamic_shapes=axis)


@contextlib.contextmanager
def _backends_without_batch_heuristics():
    """Turn off oneDNN and NNPACK while lowering. Their CPU convolution heuristics ask `batch >= 16?`
    when the lowering passes re-trace a convolution, and that question, answered for the example
    batch, narrows the program's batch axis to 2..15 (ExecuTorch then refuses a batch of 16 at run
    time). Lowering computes nothing, so the switch changes no number; it is restored on exit."""
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
        yield


def _lower(program: torch.export.ExportedProgram) -> bytes:
    """An exported program lowered to XNNPACK and serialized as a .pte file's bytes."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notices from the lowering and from setting the flags; failures still raise
        with _backends_without_batch_heuristics():
            return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def require_executorch() -> None:
    """Import ExecuTorch once, quietly, or fail with one line saying how to install it."""
    # torchao (imported by ExecuTorch's quantizer) logs a deprecation warning from torch's pytree on import
    log = logging.getLogger("torch.utils._pytree")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import executorch.exir  # noqa: F401
        import executorch.runtime  # noqa: F401
    except ImportError as exc:
        raise ReprotuneError(f"export.executorch is true but ExecuTorch is not installed ({exc.name} is "
                             f"missing): {INSTALL}") from None
    finally:
        log.setLevel(level)


def export_pte(model: Classifier, example: torch.Tensor, path: Path, max_batch: int) -> None:
    """Write an fp32 ExecuTorch program for XNNPACK with a batch axis of 1..max_batch."""
    path.write_bytes(_lower(_capture(model, example, max_batch)))


def quantize_pte(model: Classifier, example: torch.Tensor, path: Path, calibration: torch.Tensor,
                 max_batch: int) -> None:
    """Write an int8 ExecuTorch program: PT2E static quantization with XNNPACK's symmetric per-channel
    scheme (int8 weights per output channel, int8 activations per tensor), calibrated on `calibration`."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        observed = prepare_pt2e(_capture(model, example, max_batch).module(), quantizer)
        step = min(CALIBRATION_BATCH, max_batch)  # the captured graph accepts batches up to max_batch
        with torch.no_grad():
            for i in range(0, len(calibration), step):
                observed(calibration[i:i + step])
        quantized = convert_pt2e(observed)
    path.write_bytes(_lower(_capture(quantized, example, max_batch)))


def write_off_note(out: Path) -> None:
    """What `models/executorch/` holds when the export is off: DVC needs each declared output to exist."""
    (out / PTE_OFF).write_text(OFF_NOTE)
