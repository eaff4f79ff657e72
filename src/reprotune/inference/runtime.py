"""Running an exported model: ONNX Runtime without torch, TorchScript and ExecuTorch with it.

Used by export (to verify each file), `reprotune predict` and the server. Importing this module does
not import torch: a prediction through ONNX Runtime starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

INPUT, OUTPUT = "image", "logits"  # the exported graphs' input and output names

Runner = Callable[[np.ndarray], np.ndarray]  # float32 images (N, 3, H, W) in [0, 1] -> logits (N, classes)


def onnx_runner(path: Path, threads: int = 0) -> Runner:
    """An ONNX Runtime session on the CPU (`threads` 0: as many as ONNX Runtime chooses)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run([OUTPUT], {INPUT: images})[0]


def torchscript_runner(path: Path) -> Runner:
    """A TorchScript module on the CPU (imports torch, which takes seconds)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu")

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(images)).numpy()

    return run


def executorch_runner(path: Path) -> Runner:
    """An ExecuTorch program (.pte) through ExecuTorch's Python runtime, its XNNPACK delegate on the CPU
    (imports torch and ExecuTorch, the `mobile` extra). A program takes batches up to the size it was
    planned for; larger ones run in slices of that size."""
    import torch

    Runtime = _executorch_runtime()
    with _stderr_silenced():  # XNNPACK's first load reports, line by line, what it reads of the CPU
        method = Runtime.get().load_program(Path(path)).load_method("forward")
    limit = method.metadata.input_tensor_meta(0).sizes()[0]

    def run(images: np.ndarray) -> np.ndarray:
        return np.concatenate([method.execute([torch.from_numpy(images[i:i + limit])])[0].numpy()
                               for i in range(0, len(images), limit)])

    return run


class _EnumConstantNotice(logging.Filter):
    """Drops torch's notice that torchao registers an Enum as a pytree constant (deprecated in torch,
    harmless here: no program is compiled), logged once per process by torch.utils._pytree."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in record.getMessage()


def _executorch_runtime():
    """ExecuTorch's Runtime class, without its compiler where nothing has loaded that yet.

    The runtime's bindings import `executorch.exir._warnings` (a decorator) and so run
    `executorch/exir/__init__.py`: the whole compiler, torch._dynamo and torchao with it, 4.5 s of
    the 6.8 s the import took on 2 cores (`python -X importtime`), and torchao's Enum notice on
    stderr. A bare package stands in for `executorch.exir` while the runtime loads, then leaves, so
    the export stage's `import executorch.exir` later still gets the real one."""
    logging.getLogger("torch.utils._pytree").addFilter(_EnumConstantNotice())
    if "executorch.exir" not in sys.modules:
        spec = importlib.util.find_spec("executorch.exir")
        if spec is not None and spec.submodule_search_locations is not None:
            bare = types.ModuleType("executorch.exir")
            bare.__path__ = list(spec.submodule_search_locations)
            sys.modules["executorch.exir"] = bare
            try:
                from executorch.runtime import Runtime
            finally:
                del sys.modules["executorch.exir"]
            return Runtime
    from executorch.runtime import Runtime

    return Runtime


@contextlib.contextmanager
def _stderr_silenced():
    """Silence standard error for the block: file descriptor 2, where native code writes, and
    Python's sys.stderr, where ExecuTorch's bindings redirect C++'s std::cerr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities per row, computed in float64 (stable for large logits)."""
    shifted = logits.astype(np.float64) - logits.max(1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(1, keepdims=True)
