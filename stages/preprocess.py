"""DVC stage `preprocess`: validate the archive and cache train/val/test as uint8 tensors."""

from pathlib import Path

import torch

from reprotune import data, tb
from reprotune.config import load_params
from reprotune.io import atomic_dir, write_json
from reprotune.stage import ParamsFile, run_stage

ARCHIVE = Path("data/raw/cifar-10-python.tar.gz")
PROCESSED = Path("data/processed")


def main(params: ParamsFile = Path("params.yaml")) -> None:
    cfg = load_params(params)
    with tb.stage_writer("runs/preprocess") as writer:
        splits, metrics = data.preprocess(ARCHIVE, cfg.data, cfg.seed, cfg.log.images, writer)
    with atomic_dir(PROCESSED) as tmp:
        for name, split in splits.items():
            torch.save(split.to_dict(), tmp / f"{name}.pt")
    write_json("metrics/preprocess.json", metrics)
    print(", ".join(f"{name} {len(s.labels):,}" for name, s in splits.items()) + f" images -> {PROCESSED}/")


if __name__ == "__main__":
    run_stage(main)
