"""Named recipes: the few params a kind of job needs changed from params.yaml's defaults, measured.

A recipe is a set of `dvc exp run -S` overrides, nothing more: `dvc exp run $(reprotune recipe
scratch)` runs one as an experiment, and params.yaml keeps showing every value. Each recipe's
figures come from `python bench/recipes.py` (bench/results/recipes.md), against a plain PyTorch
loop with the same optimizer settings on the same data; docs/reference/recipes.md quotes them.
Everything a recipe leaves out stays at its default, augmentation included, so the recipes also
test the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from reprotune.config import Params, describe
from reprotune.errors import ReprotuneError


@dataclass(frozen=True)
class Recipe:
    summary: str  # what job it is for, in a line
    overrides: dict[str, Any]  # params.yaml key (section.field) -> value, as `dvc exp run -S` takes them

    def arguments(self) -> list[str]:
        """The `-S key=value` pairs for `dvc exp run`, values as YAML spells them."""
        return [arg for key, value in self.overrides.items() for arg in ("-S", f"{key}={_yaml(value)}")]

    def params(self, base: dict | None = None) -> Params:
        """`base` (a params.yaml's contents; the defaults when None) with the overrides applied,
        validated: ReprotuneError naming the key when they do not fit together."""
        merged = {section: dict(values) if isinstance(values, dict) else values
                  for section, values in (base or {}).items()}
        for key, value in self.overrides.items():
            section, _, field = key.partition(".")
            if field:
                merged.setdefault(section, {})[field] = value
            else:
                merged[section] = value
        try:
            return Params.model_validate(merged)
        except ValidationError as exc:
            raise ReprotuneError(describe(exc.errors()[0])) from None


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


RECIPES = {
    # `reprotune demo` (`make demo`): the whole DAG offline, in minutes on a laptop's CPU. The synthetic
    # dataset (CIFAR-10 has 50,000 training images), random weights (ImageNet's need a network), a
    # CPU-sized run; from scratch wants a larger LR than fine-tuning's 0.01 (per batch of 64).
    "demo": Recipe("the offline demo: synthetic data, random weights, a CPU-sized run (`reprotune demo`)", {
        "data.dataset": "synthetic", "data.synthetic_train": 5000, "data.synthetic_test": 1000,
        "model.weights": "none", "train.epochs": 3, "train.batch_size": 64, "train.lr": 0.05}),
    # Random weights on a small dataset: 10x fine-tuning's LR, a smaller batch for more steps, and no
    # random crop: in 5 epochs it cost 1.2 points on handwritten digits and 1.1 on MNIST (3 seeds
    # each, bench/results/recipes.md) by slowing the fit. Longer runs can turn it back on.
    "scratch": Recipe("train from random weights on a small dataset (thousands of images, 32 px)", {
        "model.weights": "none", "train.lr": 0.05, "train.batch_size": 64, "train.epochs": 5,
        "train.random_crop": 0}),
    # A pretrained backbone on images at their own small size. No random crop either: in 5 epochs it
    # cost 2.4 points on digits from an MNIST-trained backbone (bench/results/recipes.md).
    "finetune-32": Recipe("fine-tune a pretrained backbone on 32 px images", {
        "train.lr": 0.01, "train.batch_size": 64, "train.epochs": 5, "train.random_crop": 0}),
    # The classic ImageNet transfer: images resized to the backbone's training size on the device.
    # finetune-32's settings (the crop's cost in 5 epochs was measured at 32 px only: a CPU run at
    # 224 px takes 49x as long).
    "finetune-224": Recipe("fine-tune an ImageNet backbone with images resized to 224 px (~49x the FLOPs)", {
        "model.image_size": 224, "train.lr": 0.01, "train.batch_size": 64, "train.epochs": 5,
        "train.random_crop": 0}),
}
