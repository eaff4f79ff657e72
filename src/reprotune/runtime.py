"""Running an exported model: ONNX Runtime without torch, TorchScript with it.

Used by export (to verify each file), `reprotune predict` and the server. Importing this module does
not import torch: a prediction through ONNX Runtime starts in a fraction of a second.
"""

from __future__ import annotations

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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities per row, computed in float64 (stable for large logits)."""
    shifted = logits.astype(np.float64) - logits.max(1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(1, keepdims=True)
