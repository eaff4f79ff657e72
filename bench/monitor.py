"""How often `reprotune monitor` cries wolf, and how often it sees a real shift, on the demo's data.

    python bench/monitor.py [--resamples 100] [--images 500] [--permutations 500]

Trains the demo's model (`reprotune demo`'s settings, as bench/compress.py does) and builds the drift
reference from its validation split exactly as the evaluate stage does. Then, `--resamples` times
each, draws `--images` new images and runs the monitor's own checks (`reprotune.evaluation.drift.detect`):

- false alarms: fresh images from the training distribution (the synthetic generator, new seeds):
  the share of checks whose verdict is drift; goal at most 5%;
- detection, per shift: brightness, contrast, blur, noise, rotation (each at the weakest strength of
  a grid that costs the model at least 5 points of accuracy, measured on 4,000 images), a missing
  class (its images replaced by the others'), and a new class the model never saw (a tenth of the
  images); goal at least 95% for every shift that costs 5 points or more.

Writes bench/results/monitor.json and bench/results/monitor.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from reprotune.data.splits import make_splits, to_float
from reprotune.data.synthetic import SYNTHETIC_CLASSES, synthetic_images, synthetic_raw
from reprotune.evaluation.drift import detect  # noqa: E402
from reprotune.evaluation.reference import build_reference, observe
from reprotune.evaluation.report import classification_metrics  # noqa: E402
from reprotune.recipes import RECIPES
from reprotune.training.augment import rotate
from reprotune.training.checkpoint import Checkpoints  # noqa: E402
from reprotune.training.loop import finetune  # noqa: E402
from reprotune.training.scoring import batched_logits

RESULTS = Path(__file__).parent / "results"
COST_GOAL, ALARM_GOAL, DETECT_GOAL = 0.05, 0.05, 0.95


def fresh(n: int, seed: int, classes: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n new images of the training distribution (labels uniform over `classes`, all ten by default)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.arange(10) if classes is None else classes, n)
    return torch.from_numpy(synthetic_images(labels, rng).reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def _new_class(n: int, seed: int) -> torch.Tensor:
    """Images of a class the model never saw: diagonal stripes in cyan, none of the ten classes' colours."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.arange(32.0)
    stripes = torch.sin((ramp[:, None] + ramp[None, :]) * 0.9 + torch.rand(n, 1, 1, generator=g) * 6.3)
    image = torch.tensor([0.15, 0.8, 0.8]).view(1, 3, 1, 1) + 0.12 * stripes[:, None] \
        + torch.randn(n, 3, 32, 32, generator=g) * 0.2
    return _to_uint8(image.clamp(0, 1))


# Graded shifts: strength -> images. Each grid runs from mild to strong.
def brightness(x, s, g):
    return _to_uint8(to_float(x) * (1 - s))


def contrast(x, s, g):
    f = to_float(x)
    return _to_uint8(f.mean((1, 2, 3), keepdim=True) + (f - f.mean((1, 2, 3), keepdim=True)) * (1 - s))


def blur(x, s, g):
    k = int(s)  # box blur of side k, applied twice: close to a Gaussian
    f = to_float(x)
    for _ in range(2):
        f = F.avg_pool2d(F.pad(f, (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2), mode="replicate"), k, 1)
    return _to_uint8(f)


def noise(x, s, g):
    return _to_uint8(to_float(x) + torch.randn(x.shape, generator=g) * s)


def rotation(x, s, g):
    degrees = (torch.rand(len(x), generator=g) * 2 - 1) * s
    return _to_uint8(rotate(to_float(x), degrees).clamp(0, 1))


GRADED = {"brightness": (brightness, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "darker by {:.0%}"),
          "contrast": (contrast, [0.2, 0.4, 0.6, 0.7, 0.8, 0.9], "contrast -{:.0%}"),
          "blur": (blur, [2, 3, 4, 5, 7], "box blur {:.0f} px, twice"),
          "noise": (noise, [0.05, 0.1, 0.15, 0.2, 0.3, 0.4], "Gaussian noise sd {:.2f}"),
          "rotation": (rotation, [10, 20, 30, 45, 60, 90], "random rotation up to {:.0f} degrees")}


def accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    return classification_metrics(batched_logits(model, images, 512), labels, SYNTHETIC_CLASSES)["test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=100)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--permutations", type=int, default=500)
    args = parser.parse_args()
    started = time.perf_counter()
    # the demo's data (synthetic, 10% of the training images for validation) and recipe, on the CPU
    demo = RECIPES["demo"].params({"log": {"graph": False, "histograms": False, "images": 0},
                                   "train": {"device": "cpu"}})
    splits = make_splits(synthetic_raw(demo.data.synthetic_train, demo.data.synthetic_test, seed=0), 0.1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        model = finetune(demo, splits["train"], splits["val"],
                         Checkpoints(Path(tmp) / "base", "base")).model.cpu().eval()
    with torch.no_grad():
        test_metrics = classification_metrics(model(to_float(splits["test"].images)), splits["test"].labels,
                                              SYNTHETIC_CLASSES)
    reference = build_reference(model, splits["val"], test_metrics, "bench")
    big_images, big_labels = fresh(4000, 1)
    clean = accuracy(model, big_images, big_labels)
    print(f"demo model: accuracy {clean:.4f} on 4,000 fresh images; reference: {reference['images']} images",
          flush=True)

    # Shifts: the weakest graded strength that costs COST_GOAL, and the two class shifts.
    shifts = {}
    g = torch.Generator().manual_seed(2)
    for name, (fn, grid, label) in GRADED.items():
        for strength in grid:
            cost = clean - accuracy(model, fn(big_images, strength, g), big_labels)
            if cost >= COST_GOAL or strength == grid[-1]:
                shifts[name] = {"make": (lambda x, s=strength, fn=fn: fn(x, s, g)), "what": label.format(strength),
                                "cost": cost}
                break
    kept = np.arange(1, 10)  # class 0 missing: its share goes to the other nine
    shifts["missing class"] = {"make": None, "what": f"no '{SYNTHETIC_CLASSES[0]}' images",
                               "cost": clean - accuracy(model, *fresh(4000, 3, kept))}
    new_share = 0.1
    mixed_labels = big_labels.clone()
    mixed = big_images.clone()
    count = int(new_share * len(mixed))
    mixed[:count] = _new_class(count, 4)
    mixed_labels[:count] = -1  # never right: the model has no such class
    with torch.no_grad():
        predicted = torch.cat([model(to_float(mixed[i:i + 512])).argmax(1) for i in range(0, len(mixed), 512)])
    shifts["new class"] = {"make": None, "what": f"{new_share:.0%} of the images of an unseen class",
                           "cost": clean - (predicted == mixed_labels).double().mean().item()}

    rows = {"no shift (false alarms)": {"what": "fresh images of the training distribution", "cost": 0.0}}
    rows.update({name: {"what": s["what"], "cost": s["cost"]} for name, s in shifts.items()})
    for row in rows.values():
        row["drift"], row["families"] = 0, {}
    for r in range(args.resamples):
        seed = 1000 + r
        images, _ = fresh(args.images, seed)
        cases = {"no shift (false alarms)": images}
        for name, s in shifts.items():
            if s["make"] is not None:
                cases[name] = s["make"](images)
        cases["missing class"] = fresh(args.images, seed, kept)[0]
        new = images.clone()
        new[: int(new_share * args.images)] = _new_class(int(new_share * args.images), seed)
        cases["new class"] = new
        for name, batch in cases.items():
            report = detect(reference, observe(model, batch), permutations=args.permutations, seed=seed)
            rows[name]["drift"] += report["drift"]
            for family in report["drifted"]:
                rows[name]["families"][family] = rows[name]["families"].get(family, 0) + 1
        if (r + 1) % 10 == 0:
            print(f"{r + 1}/{args.resamples} resamples, {time.perf_counter() - started:.0f} s", flush=True)
    for row in rows.values():
        row["rate"] = row["drift"] / args.resamples
    report = {"args": vars(args), "clean_accuracy": clean, "reference_images": reference["images"],
              "seconds": time.perf_counter() - started, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "monitor.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Demo model (accuracy {clean:.3f} on fresh images), reference: its {reference['images']} validation "
             f"images; {args.resamples} resamples of {args.images} images each; {args.permutations} permutations; "
             f"`python bench/monitor.py --resamples {args.resamples} --images {args.images} --permutations "
             f"{args.permutations}` ({report['seconds'] / 60:.0f} min on {os.cpu_count()} cores).", "",
             "| new images | shift | accuracy cost | verdict drift | families that saw it | goal |",
             "| --- | --- | ---: | ---: | --- | --- |"]
    for name, row in rows.items():
        goal = (f"<= {ALARM_GOAL:.0%}" if name.startswith("no shift") else
                f">= {DETECT_GOAL:.0%}" if row["cost"] >= COST_GOAL else "none (costs < 5 points)")
        families = ", ".join(f"{f} {n / args.resamples:.0%}" for f, n in sorted(row["families"].items()))
        lines.append(f"| {name} | {row['what']} | {100 * row['cost']:.1f} pts | {row['rate']:.0%} | "
                     f"{families or '-'} | {goal} |")
    (RESULTS / "monitor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
