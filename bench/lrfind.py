"""Does `reprotune lr-find`'s suggestion train well? Its two rules against fixed LRs, from scratch.

    OMP_NUM_THREADS=1 python bench/lrfind.py [--datasets synthetic digits] [--epochs 5] [--sweeps 3]

For each dataset: the LR range test (`reprotune.training.lrfind.sweep`, the command's defaults: 100 steps
from 1e-6 to 10) on the training split, `--sweeps` times with different seeds (how much does a
suggestion move from sweep to sweep?), then the from-scratch recipe (ResNet18, `model.weights none`,
SGD + momentum, batch 64, `--epochs` epochs, cosine, `grad_clip 1.0`, flips off) trained once (seed 0)
at each rule's suggestion from the seed-0 sweep and at the fixed LRs 0.01, 0.05 and 0.2, scored on the
test split. Prints the tables and writes bench/results/lrfind.md.

Datasets: `synthetic`, the demo's (5,000 training images, `reprotune demo`), and `digits`, scikit-learn's
real handwritten digits as a folder tree at 32 px (`python bench/realdata.py` writes it; the `bench`
extra installs its source).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from reprotune.config import DataConfig, Params
from reprotune.data import folders
from reprotune.recipes import RECIPES
from reprotune.training import lrfind
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.loop import finetune
from reprotune.training.scoring import batched_logits, loss_and_accuracy

sys.path.insert(0, str(Path(__file__).parent))
import realdata  # noqa: E402 - bench/ is not a package

from reprotune.data.cifar import read_archive
from reprotune.data.splits import Split, make_splits
from reprotune.data.synthetic import write_synthetic_archive

RESULTS = Path(__file__).parent / "results" / "lrfind.md"
FIXED = (0.01, 0.05, 0.2)
SWEEP = {"steps": 100, "start_lr": 1e-6, "end_lr": 10.0}  # `reprotune lr-find`'s defaults
DEMO_TRAIN, DEMO_TEST = (RECIPES["demo"].overrides[f"data.synthetic_{split}"] for split in ("train", "test"))


def recipe(lr: float, epochs: int, seed: int = 0) -> Params:
    """The from-scratch recipe at `lr` (docs/reference/recipes.md's scratch, flips off)."""
    return Params.model_validate({
        "seed": seed, "model": {"weights": "none"},
        "log": {"graph": False, "images": 0, "histograms": False},
        "train": {"optimizer": "sgd", "batch_size": 64, "epochs": epochs, "scheduler": "cosine", "grad_clip": 1.0,
                  "hflip": False, "lr": lr}})


def splits_of(name: str, work: Path) -> dict[str, Split]:
    """train/val/test as the preprocess stage makes them (val 10% of train, seed 0)."""
    if name == "synthetic":
        archive = work / "cifar-10-python.tar.gz"
        write_synthetic_archive(archive, DEMO_TRAIN, DEMO_TEST, seed=0)
        raw = read_archive(archive)
    else:
        tree = realdata.write_tree(name)
        raw = folders.read(DataConfig(dataset="folder", path=str(tree), image_size=32))
    return make_splits(raw, 0.1, seed=0)


def test_accuracy(params: Params, splits: dict[str, Split], work: Path) -> float:
    """Test accuracy of one training run's best-validation epoch."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        result = finetune(params, splits["train"], splits["val"], Checkpoints(Path(tmp), "bench"))
    return loss_and_accuracy(batched_logits(result.model, splits["test"].images, 512), splits["test"].labels)[1]


def measure(name: str, epochs: int, sweeps: int, work: Path) -> tuple[str, list[str]]:
    """One dataset's size and table rows: each rule's suggestion from each sweep and the test accuracy
    the recipe reaches at it, then the fixed LRs. Every run trains with seed 0: only the LR differs."""
    splits = splits_of(name, work)
    size = f"{name}: " + ", ".join(f"{len(s.labels):,} {part}" for part, s in splits.items()) + " images"
    accuracy: dict[float, float] = {}  # train.lr -> test accuracy; an LR two sweeps agree on trains once

    def trained(lr: float) -> float:
        if lr not in accuracy:
            started = time.perf_counter()
            accuracy[lr] = test_accuracy(recipe(lr, epochs), splits, work)
            print(f"{name}: train.lr {lr:.3g}: test acc {accuracy[lr]:.3f} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
        return accuracy[lr]

    found = []
    for seed in range(sweeps):
        started = time.perf_counter()
        result = lrfind.sweep(recipe(0.05, epochs, seed), splits["train"], **SWEEP)
        found.append(lrfind.suggestion_of(result))
        print(f"{name}: sweep {seed}: {found[-1]} ({result.stopped}, {time.perf_counter() - started:.0f} s)",
              flush=True)
    rows = []
    for rule, label in lrfind.RULES.items():
        lrs = [lr for lr in (getattr(s, rule) for s in found) if lr is not None]
        accs = [trained(lr) for lr in lrs]
        default = " (default)" if rule == lrfind.RULE else ""
        rows.append(f"| {name} | {label}{default} | {' / '.join(f'{lr:.3g}' for lr in lrs)} "
                    f"| {' / '.join(f'{a:.3f}' for a in accs)} | {np.mean(accs):.3f} | {min(accs):.3f} |")
    rows += [f"| {name} | fixed | {lr:g} | {trained(lr):.3f} | {trained(lr):.3f} | {trained(lr):.3f} |"
             for lr in FIXED]
    return size, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "digits"], choices=["synthetic", "digits"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sweeps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        sizes, tables = zip(*(measure(name, args.epochs, args.sweeps, Path(work)) for name in args.datasets),
                            strict=True)
    command = " ".join(["OMP_NUM_THREADS=1 python bench/lrfind.py", *sys.argv[1:]])
    report = "\n".join([
        "# LR range test: do its suggestions train? (from scratch)", "",
        f"`{command}`", "",
        f"Each dataset: {args.sweeps} sweeps (`reprotune lr-find`'s defaults: {SWEEP['steps']} steps from "
        f"{SWEEP['start_lr']:g} to {SWEEP['end_lr']:g}, batch 64, seeds 0..{args.sweeps - 1}: other initial "
        "weights and batches), then the recipe trained at each sweep's suggestion by each rule, and at fixed "
        f"LRs: ResNet18 from scratch, SGD + momentum 0.9, batch 64, {args.epochs} epochs, cosine, grad_clip "
        "1.0, flips off, training seed 0, the other train params at their defaults. Test accuracy of the "
        f"best-validation epoch. {'; '.join(sizes)}.", "",
        "| dataset | train.lr from | train.lr (per sweep) | test acc (per sweep) | mean | worst |",
        "| --- | --- | --- | --- | ---: | ---: |", *(row for rows in tables for row in rows), ""])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
