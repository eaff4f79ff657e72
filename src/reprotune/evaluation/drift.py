"""Drift monitoring: do new images still look like what the model was trained for?

Three families of two-sample tests compare a new batch of images with the reference (`reference.py`):

- input: per-image channel means, contrast, saturation and sharpness, each by Kolmogorov-Smirnov;
- features: the model's penultimate-layer embeddings (PCA to `PCA_DIMS`), by the maximum mean
  discrepancy with an RBF kernel, its p-value from `PERMUTATIONS` random relabellings of the pooled
  sample. Permutations, not a held-out domain classifier: the p-value is exact for any sample size
  and needs no training run per check and no third of the data set aside to test a classifier on;
  the kernel test is also the more powerful of the two at the few hundred images a check has;
- predictions: predicted-class frequencies (chi-squared) and top-1 confidence (Kolmogorov-Smirnov).

Bonferroni keeps the whole check's false-alarm rate at `alpha`: each family gets alpha / 3, split
evenly among its tests. The PCA is fitted on one half of the reference embeddings and the MMD's
reference sample drawn from the other, so the test's reference is not the data its projection was
fitted to (that would break the permutation test's exchangeability).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tensorboardX import SummaryWriter

from reprotune.config import MonitorConfig
from reprotune.data.folders import Archive, Source, Tree
from reprotune.errors import ReprotuneError
from reprotune.evaluation.reference import (
    INPUT_STATS,
    MIN_REFERENCE,
    DriftReference,
    Observation,
    load_reference,
    observe,
)
from reprotune.evaluation.report import classification_metrics
from reprotune.images import SUFFIXES
from reprotune.tracking import tensorboard
from reprotune.training.model import Classifier, load_model

FAMILIES = ("input", "features", "predictions")


# How far below its threshold a family's adjusted p-value must fall for the verdict to say drift without
# hedging. Between threshold / STRONG and the threshold it is "possible drift": a sample of a few hundred
# images of the unchanged distribution lands there now and then (the demo's first 300 test images gave
# 0.0139 against 0.0167, two other draws of 300 no drift), and a check is allowed alpha of false alarms.
STRONG = 10

FEATURE_NEW = 2000  # new images in the MMD test at most (a random sample of them beyond that)
# params.yaml's defaults (monitor.alpha, monitor.permutations), for callers without a params file
ALPHA, PERMUTATIONS = MonitorConfig().alpha, MonitorConfig().permutations


@dataclass
class Incoming:
    """New images, decoded to the model's input size, with labels when the folder had class folders."""

    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor | None
    unreadable: list[str]  # one reason per image file that could not be decoded


def read_incoming(path: Path, classes: list[str], size: int, workers: int = 2) -> Incoming:
    """Image files directly in `path` (a folder, or a tar/zip archive of one), unlabelled; or, when
    it holds only folders, labelled by those folders' names, which must be among `classes`. Files
    that are not images by their suffix (the server's .json beside each .png) are not read."""
    if not path.exists():
        raise ReprotuneError(f"{path}: no such folder or archive")
    source: Source = Archive(path) if path.is_file() else Tree(path)
    root: tuple[str, ...] = ()
    files = [f for f in source.files if Path(f.parts[-1]).suffix.lower() in SUFFIXES]
    # In an archive, one folder with no images beside it, not named as a class, is the wrapper archives
    # usually have: looked into. (In a folder it is a class folder, and checked as one.)
    while (isinstance(source, Archive) and not any(len(f.parts) == len(root) + 1 for f in files)
           and len(source.children(root)) == 1 and source.children(root)[0] not in classes):
        root = (*root, source.children(root)[0])
    files = [f for f in files if f.parts[: len(root)] == root]
    flat = [f for f in files if len(f.parts) == len(root) + 1]
    labels = None
    if not files:
        raise ReprotuneError(f"{path}: no image files ({', '.join(sorted(SUFFIXES))})")
    if not flat:  # class folders
        names = sorted({f.parts[len(root)] for f in files})
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise ReprotuneError(f"{path}: class folders {', '.join(unknown)} are not among the model's classes "
                                 f"({', '.join(classes)})")
        labels = np.array([classes.index(f.parts[len(root)]) for f in files], dtype=np.int64)
    else:
        files = flat  # images beside folders: the folders are not classes, only the images count
    images = np.empty((len(files), 3, size, size), dtype=np.uint8)
    readable = np.zeros(len(files), dtype=bool)
    unreadable = []
    for i, result in source.decoded(files, size, workers):
        if isinstance(result, str):
            unreadable.append(result)
        else:
            images[i], readable[i] = result, True
    if not readable.any():
        raise ReprotuneError(f"{path}: none of its {len(files)} image files could be read ({unreadable[0]})")
    return Incoming(torch.from_numpy(images[readable]),
                    None if labels is None else torch.from_numpy(labels[readable]), source.skipped + unreadable)


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int) -> tuple[float, float]:
    """Squared maximum mean discrepancy (biased estimate) between samples x and y under an RBF kernel
    whose bandwidth is the median pairwise distance of the pooled sample, and its permutation p-value."""
    z = torch.from_numpy(np.concatenate([x, y])).double()
    d2 = torch.cdist(z, z).square()
    positive = d2[torch.triu(torch.ones_like(d2, dtype=torch.bool), 1)]
    kernel = torch.exp(-d2 / positive.median().clamp(min=1e-12))
    n, m = len(x), len(y)
    weights = torch.cat([torch.full((n,), 1.0 / n), torch.full((m,), -1.0 / m)]).double()
    observed = float(weights @ kernel @ weights)
    generator = torch.Generator().manual_seed(seed)
    exceed = 0
    for start in range(0, permutations, 100):  # 100 relabellings per matrix product
        count = min(100, permutations - start)
        shuffled = weights[torch.argsort(torch.rand(count, n + m, generator=generator), 1)]
        exceed += int((((shuffled @ kernel) * shuffled).sum(1) >= observed - 1e-12).sum())
    return observed, (1 + exceed) / (1 + permutations)


def _bonferroni(p_values: list[float]) -> float:
    return min(1.0, min(p_values) * len(p_values))


def detect(reference: DriftReference, new: Observation, alpha: float = ALPHA, permutations: int = PERMUTATIONS,
           seed: int = 0) -> dict:
    """Every test's statistic and p-value, each family's Bonferroni-adjusted p-value and verdict, and
    the overall verdict (drift when any family's adjusted p-value is below alpha / 3)."""
    threshold = alpha / len(FAMILIES)
    inputs = {}
    for i, name in enumerate(INPUT_STATS):
        result = stats.ks_2samp(reference["stats"][:, i], new.stats[:, i])
        inputs[name] = {"statistic": float(result.statistic), "p_value": float(result.pvalue),
                        "reference_mean": float(reference["stats"][:, i].mean()), "mean": float(new.stats[:, i].mean())}
    rng = np.random.default_rng(seed)
    embedded = (new.embeddings - reference["pca_mean"]) @ reference["pca_components"].T
    if len(embedded) > FEATURE_NEW:
        embedded = embedded[rng.choice(len(embedded), FEATURE_NEW, replace=False)]
    mmd2, mmd_p = mmd_test(reference["features"], embedded, permutations, seed)
    probs = new.logits.softmax(1).numpy()
    classes = reference["classes"]
    counts = np.stack([np.bincount(reference["predicted"], minlength=len(classes)),
                       np.bincount(probs.argmax(1), minlength=len(classes))])  # (reference, new) x classes
    seen = counts[:, counts.sum(0) > 0]  # a class neither sample predicts has no expected count
    frequency = stats.chi2_contingency(seen) if seen.shape[1] > 1 else None
    top = probs.max(1)
    confidence = stats.ks_2samp(reference["confidence"], top)
    shares = counts / counts.sum(1, keepdims=True)
    predictions = {
        "class_frequency": {"statistic": float(frequency.statistic) if frequency else 0.0,
                            "p_value": float(frequency.pvalue) if frequency else 1.0,
                            "share": dict(zip(classes, shares[1].tolist(), strict=True)),
                            "reference_share": dict(zip(classes, shares[0].tolist(), strict=True))},
        "confidence": {"statistic": float(confidence.statistic), "p_value": float(confidence.pvalue),
                       "reference_mean": float(reference["confidence"].mean()), "mean": float(top.mean())}}
    families = {
        "input": {"p_value": _bonferroni([t["p_value"] for t in inputs.values()]), "tests": inputs},
        "features": {"p_value": mmd_p, "tests": {"mmd": {"statistic": mmd2, "p_value": mmd_p,
                                                         "permutations": permutations,
                                                         "reference_images": len(reference["features"]),
                                                         "images": len(embedded), "dimensions": embedded.shape[1]}}},
        "predictions": {"p_value": _bonferroni([t["p_value"] for t in predictions.values()]), "tests": predictions},
    }
    for family in families.values():
        family["drift"] = family["p_value"] < threshold
    drifted = [name for name, family in families.items() if family["drift"]]
    lowest = min(family["p_value"] for family in families.values())
    strength = "none" if not drifted else "strong" if lowest < threshold / STRONG else "borderline"
    return {"drift": bool(drifted), "drifted": drifted, "strength": strength, "alpha": alpha,
            "family_threshold": threshold, "verdict": verdict(drifted, strength, lowest, threshold), **families}


def verdict(drifted: list[str], strength: str, lowest: float, threshold: float) -> str:
    """The verdict in words as strong as the evidence: none, borderline (the lowest adjusted p-value
    within STRONG times its threshold) or strong."""
    if strength == "none":
        return "no drift detected"
    families = ", ".join(drifted)
    if strength == "borderline":
        return (f"possible drift in {families} (borderline: adjusted p {lowest:.3g} vs threshold {threshold:.3g}): "
                "look closer (TensorBoard) or check a larger sample")
    return f"drift detected in {families}: consider retraining"


def monitor(model: Classifier, reference: DriftReference, incoming: Incoming, alpha: float = ALPHA,
            permutations: int = PERMUTATIONS, seed: int = 0) -> tuple[dict, Observation]:
    """The drift report of `incoming` against `reference` (with accuracy, macro F1 and ECE next to
    the test split's when it is labelled), and what was observed of it."""
    if reference["images"] < MIN_REFERENCE:
        raise ReprotuneError(f"the drift reference holds {reference['images']} validation images; a check needs "
                             f"{MIN_REFERENCE} (a larger data.val_fraction or dataset, then `dvc repro evaluate`)")
    new = observe(model, incoming.images)
    report = {"images": len(incoming.images), "unreadable": len(incoming.unreadable),
              **detect(reference, new, alpha, permutations, seed), "reference_images": reference["images"]}
    if incoming.labels is not None:
        m = classification_metrics(new.logits, incoming.labels, reference["classes"])
        test = reference["test"]
        report["labelled"] = {"accuracy": m["test_acc"], "macro_f1": m["macro_f1"], "ece": m["ece"],
                              "test_accuracy": test["test_acc"], "test_macro_f1": test["macro_f1"],
                              "test_ece": test["ece"], "accuracy_change": m["test_acc"] - test["test_acc"]}
    return report, new


def summary(report: dict) -> str:
    """The verdict line, with what it rests on."""
    line = (f"{report['verdict']} ({report['images']} images; adjusted p: "
            + ", ".join(f"{name} {report[name]['p_value']:.3g}" for name in FAMILIES)
            + f"; threshold {report['family_threshold']:.3g})")
    if "labelled" in report:
        lab = report["labelled"]
        line += f"; accuracy {lab['accuracy']:.4f} (test {lab['test_accuracy']:.4f})"
    return line


def log_monitor(writer: SummaryWriter, report: dict, reference: DriftReference, new: Observation) -> None:
    """Drift scores as scalars, and reference-against-new histograms of every input statistic and of
    the top-1 confidence, under monitor/reference/... and monitor/new/..."""
    for name in FAMILIES:
        writer.add_scalar(f"monitor/{name}_p_value", report[name]["p_value"], 0)
    writer.add_scalar("monitor/drift", float(report["drift"]), 0)
    writer.add_scalar("monitor/mmd", report["features"]["tests"]["mmd"]["statistic"], 0)
    for i, name in enumerate(INPUT_STATS):
        writer.add_scalar(f"monitor/ks_{name}", report["input"]["tests"][name]["statistic"], 0)
        writer.add_histogram(f"monitor/reference/{name}", reference["stats"][:, i], 0)
        writer.add_histogram(f"monitor/new/{name}", new.stats[:, i], 0)
    writer.add_histogram("monitor/reference/confidence", reference["confidence"], 0)
    writer.add_histogram("monitor/new/confidence", new.logits.softmax(1).max(1).values.numpy(), 0)
    if "labelled" in report:
        for key in ("accuracy", "macro_f1", "ece"):
            writer.add_scalar(f"monitor/{key}", report["labelled"][key], 0)
    writer.add_text("monitor/verdict", summary(report), 0)
    tensorboard.log_table(writer, "monitor/tests", ["family", "test", "statistic", "p-value"],
                 [[family, name, f"{t['statistic']:.4g}", f"{t['p_value']:.3g}"]
                  for family in FAMILIES for name, t in report[family]["tests"].items()])


def check(source: Path, model_file: Path, reference_file: Path, logdir: Path, alpha: float = ALPHA,
          permutations: int = PERMUTATIONS, seed: int = 0) -> dict:
    """`reprotune monitor` and the monitor stage: check `source` against the model's reference, log
    the TensorBoard run to `logdir`, print the unreadable files and the verdict line, return the
    report. Everything is read and computed before anything is written."""
    model, _ = load_model(model_file)
    reference = load_reference(reference_file, model_file)
    incoming = read_incoming(source, reference["classes"], reference["image_size"])
    report, new = monitor(model, reference, incoming, alpha, permutations, seed)
    with tensorboard.stage_writer(logdir) as writer:
        log_monitor(writer, report, reference, new)
    for reason in incoming.unreadable:
        print(f"reprotune: skipped: {reason}", file=sys.stderr)
    print(summary(report))
    return report

