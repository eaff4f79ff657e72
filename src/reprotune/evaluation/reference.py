"""The drift reference: what the validation split looks like to the eye and to the model.

The reference is the validation split: images of the training data that the model did not fit.
(Its own training images would look unlike any new image to the model, which is more confident on
what it memorized, and every check would alarm.) The evaluate stage stores it once, in
`models/reference.pt`, with the model's md5 so that it is never compared against another model;
`drift.py` compares new images with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from reprotune.data.cache import CachedImages, batches
from reprotune.data.splits import GREY, Split, to_float
from reprotune.errors import ReprotuneError
from reprotune.files import file_md5
from reprotune.tensorfiles import load_torch, save_torch
from reprotune.training.model import Classifier
from reprotune.training.scoring import batched_logits, float_batch

REFERENCE_FORMAT = "reprotune.reference/1"
INPUT_STATS = ("red", "green", "blue", "contrast", "saturation", "sharpness")
BATCH = 256  # images per batch, fewer for large images (scoring.float_batch)
MIN_REFERENCE = 20  # validation images a drift check needs; a smaller reference is written, and refused when used
PCA_DIMS = 32  # embedding dimensions kept: ResNet18's 512 are far more than a few hundred images can test
FEATURE_REFERENCE = 1000  # reference embeddings in the MMD test (its cost grows as the square)


@dataclass
class Observation:
    """What a set of images looks like, to the eye and to the model."""

    stats: np.ndarray  # (N, len(INPUT_STATS)) per-image input statistics
    embeddings: np.ndarray  # (N, D) penultimate-layer features
    logits: torch.Tensor  # (N, classes)


def image_stats(images: torch.Tensor | CachedImages) -> np.ndarray:
    """Per-image statistics of uint8 (N, 3, H, W) images: mean red, green and blue, contrast (std of
    the luminance), saturation (mean of max - min over the channels) and sharpness (mean absolute
    Laplacian of the luminance: blur lowers it, noise raises it). All in [0, 1] units. A batch at a
    time: the float copy of a whole split is four times its size."""
    n = float_batch(images, BATCH)
    return np.concatenate([_image_stats(batch) for batch in batches(images, n)]) \
        if len(images) else np.zeros((0, len(INPUT_STATS)))



def _image_stats(images: torch.Tensor) -> np.ndarray:
    x = to_float(images)
    luma = (x * torch.tensor(GREY).view(1, 3, 1, 1)).sum(1, keepdim=True)
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    edges = torch.nn.functional.conv2d(luma, laplacian).abs().mean((1, 2, 3))
    columns = [x.mean((2, 3)), luma.std((1, 2, 3)).unsqueeze(1),
               (x.amax(1) - x.amin(1)).mean((1, 2)).unsqueeze(1), edges.unsqueeze(1)]
    return torch.cat(columns, 1).numpy().astype(np.float64)


def observe(model: Classifier, images: torch.Tensor | CachedImages) -> Observation:
    """Input statistics, penultimate embeddings (the head's input) and logits of uint8 images."""
    captured: list[torch.Tensor] = []
    hook = model.net.fc.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0].detach()))
    try:
        logits = batched_logits(model.cpu(), images, float_batch(images, BATCH))
    finally:
        hook.remove()
    return Observation(image_stats(images), torch.cat(captured).numpy().astype(np.float64), logits)


class TestFigures(TypedDict):
    """The model's test figures when the reference was made, to compare labelled new images with."""

    test_acc: float
    macro_f1: float
    ece: float


class DriftReference(TypedDict):
    """models/reference.pt, as `load_reference` returns it (arrays as numpy; saved as tensors)."""

    format: str  # REFERENCE_FORMAT
    model_md5: str  # the model it was made for: never compared against another
    classes: list[str]
    image_size: int  # side of the cached images; new images are resized to it
    images: int  # validation images behind it
    stats: np.ndarray  # (images, len(INPUT_STATS)) per-image input statistics
    predicted: np.ndarray  # (images,) the model's class for each
    confidence: np.ndarray  # (images,) its top-1 probability
    pca_mean: np.ndarray  # (512,) mean embedding of the PCA's fitting half
    pca_components: np.ndarray  # (<= PCA_DIMS, 512) principal directions
    features: np.ndarray  # (<= FEATURE_REFERENCE, <= PCA_DIMS) the held half's projected embeddings
    test: TestFigures


def build_reference(model: Classifier, val: Split, test_metrics: dict, model_md5: str, seed: int = 0
                    ) -> DriftReference:
    """The held-out reference the monitor compares new images with (see the module's docstring).
    Written for any validation split, however small (the evaluate stage must not fail on a small
    dataset); `monitor` refuses one under MIN_REFERENCE images."""
    seen = observe(model, val.images)
    order = np.random.default_rng(seed).permutation(len(val.labels))
    fit, held = order[: len(order) // 2], order[len(order) // 2:]
    mean = seen.embeddings[fit].mean(0)
    # Principal directions of the fitting half: right singular vectors of the centred embeddings.
    _, _, vt = np.linalg.svd(seen.embeddings[fit] - mean, full_matrices=False)
    components = vt[: max(0, min(PCA_DIMS, len(fit) - 1))]
    features = (seen.embeddings[held[:FEATURE_REFERENCE]] - mean) @ components.T
    probs = seen.logits.softmax(1).numpy()
    return {"format": REFERENCE_FORMAT, "model_md5": model_md5, "classes": list(val.classes),
            "image_size": int(val.images.shape[-1]), "images": len(val.labels),
            "stats": seen.stats, "predicted": probs.argmax(1), "confidence": probs.max(1),
            "pca_mean": mean, "pca_components": components, "features": features,
            "test": {k: test_metrics[k] for k in ("test_acc", "macro_f1", "ece")}}


def save_reference(reference: DriftReference, path: Path) -> None:
    save_torch(path, {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                      for k, v in reference.items()})


def load_reference(path: Path, model_file: Path) -> DriftReference:
    """The reference made for `model_file`, or one line saying why there is none."""
    if not path.is_file():
        raise ReprotuneError(f"{model_file} has no drift reference ({path} is missing): run `dvc repro evaluate`")
    saved = load_torch(path, "drift reference")
    if not isinstance(saved, dict) or saved.get("format") != REFERENCE_FORMAT:
        raise ReprotuneError(f"{path}: not a reprotune drift reference (rerun `dvc repro evaluate`)")
    if saved["model_md5"] != file_md5(model_file):
        raise ReprotuneError(f"{path} was made for another model than {model_file}: run `dvc repro evaluate`")
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in saved.items()}

