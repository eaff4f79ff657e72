"""TensorBoard logging (tensorboardX): the one place that creates writers and shapes what they log.

Each stage logs into `runs/<stage>/`. The writer writes into a temporary directory that replaces
the old run only when the stage succeeds, so a failed stage never leaves half a log behind.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams

from reprotune.files import atomic_dir


def _pyplot():
    """matplotlib's pyplot, headless (figures are rendered to images for TensorBoard), imported on
    first use: with torchvision's, its import is seconds of every stage's start that draws nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def stage_writer(logdir: str | Path) -> Iterator[SummaryWriter]:
    """A SummaryWriter whose run replaces `logdir` once the block succeeds."""
    with atomic_dir(logdir) as tmp, SummaryWriter(str(tmp)) as writer:
        yield writer


def open_writer(logdir: str | Path, purge_step: int | None = None) -> SummaryWriter:
    """A writer for a live run. `purge_step` (on resume) makes TensorBoard drop the killed
    session's events at that step or later, so steps never appear twice."""
    return SummaryWriter(str(logdir), purge_step=purge_step)


def publish(logdir: str | Path, dest: str | Path) -> None:
    """Copy a finished live run into `dest` (a stage output), replacing it atomically."""
    with atomic_dir(dest) as tmp:
        shutil.copytree(logdir, tmp, dirs_exist_ok=True)


def log_layout(writer: SummaryWriter) -> None:
    """Custom-scalars layout: train and val on one chart each for loss and accuracy."""
    # Each tag is a regular expression TensorBoard searches for: anchored, or "train/loss" would
    # also draw train/loss_scale (the AMP loss scale) among the losses.
    writer.add_custom_scalars({
        "train vs val": {"loss": ["Multiline", ["^train/loss$", "^val/loss$"]],
                         "accuracy": ["Multiline", ["^train/acc$", "^val/acc$"]]},
        "optimization": {"learning rate": ["Multiline", ["^train/lr$", "^train/lr_backbone$"]],
                         "gradient norm": ["Multiline", ["^train/grad_norm$"]],
                         "loss scale": ["Multiline", ["^train/loss_scale$"]]},
    })


def image_grid(images: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` images (N, 3, H, W), uint8 or float in [0, 1] (augmented batches), tiled 8
    to a row, as a (3, H', W') uint8 grid."""
    images = images[:count].cpu()
    if images.is_floating_point():  # rounded: tensorboardX would truncate 254.99 to 254
        images = images.mul(255).round_().to(torch.uint8)
    import torchvision  # on first use: see _pyplot

    return torchvision.utils.make_grid(images, nrow=8, padding=2)


def log_samples(writer: SummaryWriter, tag: str, images: torch.Tensor, labels: torch.Tensor,
                classes: list[str], count: int, step: int = 0) -> None:
    """An image grid of `count` samples, and their labels as text in grid order."""
    if count == 0 or len(images) == 0:
        return
    writer.add_image(tag, image_grid(images, count), step)
    names = [classes[i] for i in labels[:count].tolist()]
    rows = [" | ".join(names[i:i + 8]) for i in range(0, len(names), 8)]
    writer.add_text(f"{tag}_labels", "  \n".join(rows), step)


def log_table(writer: SummaryWriter, tag: str, header: list[str], rows: list[list], step: int = 0) -> None:
    """A markdown table in the TEXT tab."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    writer.add_text(tag, "\n".join(lines), step)


HISTOGRAM_SAMPLES = 16_384  # values per tensor: the same shape of histogram at a fraction of the cost


def _sample(values: torch.Tensor) -> torch.Tensor:
    """At most HISTOGRAM_SAMPLES evenly strided values, copied to the CPU as float32."""
    flat = values.detach().flatten()
    stride = max(1, -(-flat.numel() // HISTOGRAM_SAMPLES))
    return flat[::stride].float().cpu()


def log_histograms(writer: SummaryWriter, model: torch.nn.Module, step: int) -> None:
    """Weight and gradient histograms per trainable parameter tensor (strided samples of big ones)."""
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        writer.add_histogram(f"weights/{name}", _sample(param), step)
        if param.grad is not None:
            writer.add_histogram(f"grads/{name}", _sample(param.grad), step)


def log_hparams(writer: SummaryWriter, hparam_dict: dict, metric_dict: dict[str, float]) -> None:
    """The run's hyperparameters and final metrics for the HPARAMS tab, in this run (no sub-run)."""
    exp, ssi, sei = hparams(hparam_dict, metric_dict)
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)
    for name, value in metric_dict.items():
        writer.add_scalar(name, value, 0)


def log_confusion(writer: SummaryWriter, tag: str, matrix: np.ndarray, classes: list[str]) -> None:
    """A confusion-matrix figure: rows are actual classes, columns predicted, cells counts."""
    size = max(5.0, 0.6 * len(classes))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="actual")
    ax.set_xticklabels(classes, rotation=60, ha="right")
    ax.set_yticklabels(classes)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > threshold else "black")
    fig.tight_layout()
    writer.add_figure(tag, fig, 0)  # closes the figure


def log_predictions(writer: SummaryWriter, tag: str, images: torch.Tensor, labels: torch.Tensor,
                    predicted: torch.Tensor, classes: list[str], step: int) -> None:
    """A grid of images titled `predicted (actual)`, green when right and red when wrong."""
    count = len(images)
    cols = min(8, count)
    rows = (count + cols - 1) // cols
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, actual, guess in zip(axes.flat, images.cpu(), labels.tolist(), predicted.tolist(), strict=False):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(f"{classes[guess]}\n({classes[actual]})", fontsize=6,
                     color="green" if guess == actual else "red")
    fig.tight_layout()
    writer.add_figure(tag, fig, step)


def log_reliability(writer: SummaryWriter, tag: str, frame, ece: float) -> None:
    """Reliability diagram: accuracy against mean confidence per bin; the diagonal is perfect."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    seen = frame["count"] > 0
    width = 1 / len(frame)
    ax.bar(frame["bin_upper"][seen] - width / 2, frame["accuracy"][seen], width=width, edgecolor="black",
           label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.plot(frame["confidence"][seen], frame["accuracy"][seen], "o-", color="tab:red", label="mean confidence")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"ECE {ece:.4f}")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    writer.add_figure(tag, fig, 0)
