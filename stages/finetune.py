"""DVC stage `finetune`: fine-tune ResNet18 on the cached splits, keep the best epoch, resume if killed.

With train.nproc x train.nnodes > 1 the script relaunches itself through torchrun (DDP); rank 0
writes every output. On the other machines of a multi-node run: `python stages/finetune.py --node-rank N`.
"""

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from reprotune.config import load_params
from reprotune.data.splits import load_split
from reprotune.entrypoint import ParamsFile, run_stage
from reprotune.files import atomic_file, write_json
from reprotune.tracking import tensorboard
from reprotune.training import distributed
from reprotune.training.checkpoint import Checkpoints, run_key
from reprotune.training.loop import finetune
from reprotune.training.model import save_model

SPLITS = [Path("data/processed/train.pt"), Path("data/processed/val.pt")]
MODEL = Path("models/model.pt")
WORK = Path("runs/finetune.live")  # checkpoint + live log; not a DVC output, so a rerun resumes


def main(params: ParamsFile = Path("params.yaml"),
         node_rank: Annotated[int, typer.Option(help="This machine's place in a multi-node run "
                                                      "(0 runs `dvc repro`).")] = 0) -> None:
    cfg = load_params(params)
    if distributed.needs_launch(cfg.train, node_rank):
        distributed.launch(cfg.train, [distributed.script_path(__file__), "--params", str(params)], node_rank)
        return
    with distributed.process_group(cfg) as group:
        train, val = (load_split(path) for path in SPLITS)
        checkpoints = Checkpoints(WORK, run_key(cfg, SPLITS))
        result = finetune(cfg, train, val, checkpoints, group)
    if result is None:
        return  # not rank 0: rank 0 writes the outputs
    tensorboard.publish(checkpoints.logdir, "runs/finetune")
    save_model(MODEL, result.model, cfg.model, train.classes,
               {"best_epoch": result.metrics["best_epoch"], "val_acc": result.metrics["best_val_acc"],
                "seed": cfg.seed, "train": cfg.train.model_dump(mode="json"),
                "input_size": int(train.images.shape[-1])})  # the side of the images it is fed
    with atomic_file("metrics/train_history.csv") as tmp:
        pd.DataFrame(result.history).to_csv(tmp, index=False)
    write_json("metrics/train.json", result.metrics)
    checkpoints.remove()
    print(f"{MODEL}: best val acc {result.metrics['best_val_acc']:.4f} (epoch {result.metrics['best_epoch']})")


if __name__ == "__main__":
    run_stage(main)
