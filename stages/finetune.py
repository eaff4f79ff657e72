"""DVC stage `finetune`: fine-tune ResNet18 on the cached splits, keep the best epoch, resume if killed."""

from pathlib import Path

import pandas as pd

from reprotune import tb
from reprotune.checkpoint import Checkpoints, run_key
from reprotune.cli import ParamsFile, run_stage
from reprotune.config import load_params
from reprotune.data import load_split
from reprotune.io import atomic_file, write_json
from reprotune.model import save_model
from reprotune.train import finetune

SPLITS = [Path("data/processed/train.pt"), Path("data/processed/val.pt")]
MODEL = Path("models/model.pt")
WORK = Path("runs/finetune.live")  # checkpoint + live log; not a DVC output, so a rerun resumes


def main(params: ParamsFile = Path("params.yaml")) -> None:
    cfg = load_params(params)
    train, val = (load_split(path) for path in SPLITS)
    checkpoints = Checkpoints(WORK, run_key(cfg, SPLITS))
    result = finetune(cfg, train, val, checkpoints)
    tb.publish(checkpoints.logdir, "runs/finetune")
    save_model(MODEL, result.model, cfg.model, train.classes,
               {"best_epoch": result.metrics["best_epoch"], "val_acc": result.metrics["best_val_acc"],
                "seed": cfg.seed, "train": cfg.train.model_dump(mode="json")})
    with atomic_file("metrics/train_history.csv") as tmp:
        pd.DataFrame(result.history).to_csv(tmp, index=False)
    write_json("metrics/train.json", result.metrics)
    checkpoints.remove()
    print(f"{MODEL}: best val acc {result.metrics['best_val_acc']:.4f} (epoch {result.metrics['best_epoch']})")


if __name__ == "__main__":
    run_stage(main)
