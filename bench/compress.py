"""Does compression keep what it promises on real data? Accuracy, FLOPs and speed before and after.

    python bench/compress.py [--datasets digits mnist5k synthetic] [--seeds 0] [--ratio 0.2]
                             [--lr 0.01] [--distill 0.0] [--min-steps 500] [--epochs 3] [--control]

For each dataset and seed: train the base model the way a user would (the scratch recipe of docs/reference/recipes.md
on the real sets, `bench/realdata.py`'s digits and mnist5k read through the folder reader as
`data.dataset: folder` does; the demo's recipe on the synthetic set), then run the compress stage's own
function at `--ratio` (0.2: about half ResNet18's FLOPs) with each combination of `--lr`, `--distill`
and `--min-steps` (defaults: `compress`'s own): prune, recover through the finetune loop, measure
before and after (test accuracy in PyTorch; ONNX Runtime batch-256 throughput on this machine's CPU,
the two models timed side by side) and gate at `compress.max_acc_drop`. `--control` adds the recovery
sized by epochs alone (`min_steps` 0, lr 0.01, no distillation: the defaults before issue 23).
Writes bench/results/compress.json and bench/results/compress.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from reprotune.config import CompressConfig, DataConfig, Params
from reprotune.data import folders
from reprotune.export.compress import compress
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.loop import finetune

sys.path.insert(0, str(Path(__file__).parent))
from realdata import write_tree  # noqa: E402 - a sibling script, not a package

from reprotune.data.splits import Split, make_splits
from reprotune.data.synthetic import synthetic_raw
from reprotune.recipes import RECIPES

RESULTS = Path(__file__).parent / "results"
LOG = {"graph": False, "histograms": False, "images": 0}
# The from-scratch recipe (docs/reference/recipes.md) on a small real dataset (issue 23): digits are not mirror images,
# and random_crop 0 keeps the base model's accuracy independent of the crop's default padding.
SCRATCH = {"model": {"weights": "none"}, "log": LOG,
           "train": {"epochs": 5, "batch_size": 64, "lr": 0.05, "optimizer": "sgd", "scheduler": "cosine",
                     "grad_clip": 1.0, "hflip": False, "random_crop": 0, "device": "cpu"}}
# `reprotune demo`'s recipe on the synthetic set, on the CPU.
DEMO = RECIPES["demo"].params({"log": LOG, "train": {"device": "cpu"}}).model_dump()
CONTROL = {"min_steps": 0, "lr": 0.01, "distill": 0.0}  # recovery by epochs alone: 3 epochs at lr 0.01


def demo_splits(n_train: int = DEMO["data"]["synthetic_train"], n_test: int = DEMO["data"]["synthetic_test"]
                ) -> dict[str, Split]:
    """The demo's data: synthetic images, 10% of the training ones held out for validation."""
    return make_splits(synthetic_raw(n_train, n_test, seed=0), 0.1, seed=0)


def dataset(name: str) -> tuple[dict[str, Split], dict]:
    """A dataset's splits (as the preprocess stage makes them) and the recipe its base model trains with."""
    if name == "synthetic":
        return demo_splits(), DEMO
    cfg = DataConfig(dataset="folder", path=str(write_tree(name)), image_size=32)
    return make_splits(folders.read(cfg), cfg.val_fraction, seed=0), SCRATCH


def variants(args: argparse.Namespace) -> list[dict]:
    """The compress settings each base model goes through: every combination asked for, control first."""
    grid = [{"min_steps": m, "lr": lr, "distill": d} for m, lr, d in itertools.product(args.min_steps, args.lr,
                                                                                       args.distill)]
    return ([CONTROL] if args.control else []) + [v for v in grid if v != CONTROL]


def run(name: str, seed: int, args: argparse.Namespace, work: Path) -> list[dict]:
    """Train one base model, then compress it with each variant: one row per variant."""
    splits, recipe = dataset(name)
    base_params = Params.model_validate({**recipe, "seed": seed})
    started = time.perf_counter()
    base = finetune(base_params, splits["train"], splits["val"], Checkpoints(work / f"{name}{seed}", "base"))
    base_seconds = time.perf_counter() - started
    rows = []
    for i, variant in enumerate(variants(args)):
        compress_cfg = {"ratio": args.ratio, "epochs": args.epochs, **variant}
        params = Params.model_validate({**recipe, "seed": seed, "compress": compress_cfg})
        started = time.perf_counter()
        _, metrics, verdict = compress(params, base.model, splits["train"], splits["val"], splits["test"],
                                       Checkpoints(work / f"{name}{seed}-{i}", "recovery"))
        rows.append({"dataset": name, "seed": seed, "train_images": len(splits["train"].labels),
                     "test_images": len(splits["test"].labels), "base_seconds": base_seconds,
                     "compress": params.compress.model_dump(), "accepted": verdict is None,
                     "seconds": time.perf_counter() - started, **metrics})
        print(f"{name} seed {seed} {variant}: {metrics['before']['test_acc']:.4f} -> {metrics['test_acc']:.4f} "
              f"({metrics['acc_change']:+.4f}) at {metrics['flops_ratio']:.2f}x FLOPs, "
              f"{metrics['speedup']:.2f}x throughput, {metrics['recovery'].get('steps', 0)} recovery steps, "
              f"{'accepted' if verdict is None else 'rejected'}", flush=True)
    return rows


def table(rows: list[dict]) -> list[str]:
    """Markdown: one line per dataset and variant, mean (and range, with several seeds) over seeds."""
    lines = ["| dataset | train / test images | recovery (min_steps, lr, distill) | recovery steps | "
             "test acc unpruned | compressed | change | before recovery | FLOPs | batch-256 speedup | "
             "gate (max_acc_drop) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        c = row["compress"]
        groups.setdefault((row["dataset"], c["min_steps"], c["lr"], c["distill"]), []).append(row)
    for (name, min_steps, lr, distill), runs in groups.items():
        def mean(get) -> float:
            return statistics.fmean(get(r) for r in runs)

        def spread(get) -> str:
            values = [get(r) for r in runs]
            return f" ({min(values):+.4f} to {max(values):+.4f})" if len(values) > 1 else ""

        first, accepted = runs[0], sum(r["accepted"] for r in runs)
        recipe = f"{min_steps}, {lr}, {distill}"
        if {"min_steps": min_steps, "lr": lr, "distill": distill} == CONTROL:
            recipe += " (control: epochs only)"
        lines.append(
            f"| {name} | {first['train_images']:,} / {first['test_images']:,} | {recipe} | "
            f"{first['recovery'].get('steps', 0)} | {mean(lambda r: r['before']['test_acc']):.4f} | "
            f"{mean(lambda r: r['test_acc']):.4f} | {mean(lambda r: r['acc_change']):+.4f}"
            f"{spread(lambda r: r['acc_change'])} | {mean(lambda r: r['pruned_test_acc']):.4f} | "
            f"{mean(lambda r: r['flops_ratio']):.2f}x | {mean(lambda r: r['speedup']):.2f}x | "
            f"{accepted}/{len(runs)} pass ({first['compress']['max_acc_drop']}) |")
    return lines


def main() -> None:
    defaults = CompressConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k", "synthetic"],
                        choices=["digits", "mnist5k", "synthetic"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ratio", type=float, default=0.2, help="compress.ratio")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="compress.epochs")
    parser.add_argument("--min-steps", type=int, nargs="+", default=[defaults.min_steps], help="compress.min_steps")
    parser.add_argument("--lr", type=float, nargs="+", default=[defaults.lr], help="compress.lr")
    parser.add_argument("--distill", type=float, nargs="+", default=[defaults.distill], help="compress.distill")
    parser.add_argument("--control", action="store_true", help="also recover by epochs alone (the old defaults)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            for seed in args.seeds:
                rows += run(name, seed, args, Path(tmp))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compress.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2) + "\n")
    command = " ".join(["python bench/compress.py", *sys.argv[1:]])
    lines = [f"`{command}`; ONNX Runtime on this machine's CPU ({os.cpu_count()} cores); "
             f"compress.ratio {args.ratio}, compress.epochs {args.epochs}; seeds {args.seeds}.", "", *table(rows)]
    (RESULTS / "compress.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
