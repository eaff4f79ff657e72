"""What `train.grad_clip` does to a run: how often it clips, and the accuracy it ends with.

    python bench/clipping.py [--quick]

Two kinds of run on the synthetic dataset (5,000 training + 1,000 validation images, 32 px, the
demo's batch of 64 at lr 0.05 from scratch and 0.01 fine-tuning, 4 epochs, SGD with momentum,
cosine schedule), each at clipping thresholds 0 (off), 1, 5 and 20 on the global gradient norm:

- from scratch: random initial weights (what the offline demo trains);
- fine-tuning: a backbone first trained on another draw of the synthetic data (seed 1), then
  fine-tuned with a fresh head (the real job's shape: pretrained weights, a new head).

Per run: best validation accuracy, the share of steps clipped, and the median gradient norm
before clipping. Writes bench/results/clipping.json and clipping.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from reprotune.config import Params
from reprotune.data.splits import Split, make_splits
from reprotune.data.synthetic import synthetic_raw
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.loop import finetune

RESULTS = Path(__file__).parent / "results"
THRESHOLDS = [0.0, 1.0, 5.0, 20.0]


def splits(n_train: int, n_val: int, seed: int) -> dict[str, Split]:
    """Train and val from one synthetic draw (no test split: the runs are compared on val)."""
    return make_splits(synthetic_raw(n_train + n_val, 0, seed), n_val / (n_train + n_val), seed=0)


def run(split, tmp: Path, name: str, epochs: int, lr: float, clip: float, weights: str = "none") -> dict:
    params = Params.model_validate({
        "model": {"weights": weights}, "log": {"graph": False, "images": 0, "histograms": False},
        "train": {"epochs": epochs, "batch_size": 64, "lr": lr, "grad_clip": clip, "device": "cpu"}})
    result = finetune(params, split["train"], split["val"], Checkpoints(tmp / name, name))
    return {"best_val_acc": result.metrics["best_val_acc"], "final_train_loss": result.metrics["final_train_loss"],
            "clip_fraction": statistics.mean(row["clip_fraction"] for row in result.history),
            "grad_norm": statistics.median(row["grad_norm"] for row in result.history),
            "first_val_loss": result.history[0]["val_loss"]}, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    n_train, n_val, epochs = (1000, 200, 2) if args.quick else (5000, 1000, 4)
    report = {"command": "python bench/clipping.py" + (" --quick" if args.quick else ""), "train_images": n_train,
              "epochs": epochs, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        target = splits(n_train, n_val, seed=0)
        print("pretraining a backbone on another draw of the data", flush=True)
        _, pretrained = run(splits(n_train, n_val, seed=1), tmp, "pretrain", epochs, 0.05, 1.0)
        weights = tmp / "backbone.pt"
        torch.save({k.removeprefix("net."): v for k, v in pretrained.model.state_dict().items()
                    if k.startswith("net.")}, weights)
        for kind, lr, source in (("from scratch", 0.05, "none"), ("fine-tuning", 0.01, str(weights))):
            for clip in THRESHOLDS:
                print(f"{kind}, grad_clip {clip:g}", flush=True)
                report["runs"][f"{kind}/{clip:g}"] = {"kind": kind, "grad_clip": clip, "lr": lr,
                                                      **run(target, tmp, f"{kind}-{clip}", epochs, lr, clip, source)[0]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "clipping.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Gradient clipping", "", f"Command: `{report['command']}` ({n_train:,} training images, {epochs} "
             "epochs, batch 64, SGD + momentum, cosine schedule, CPU)", "",
             "| run | lr | grad_clip | steps clipped | median grad norm | first-epoch val loss | best val acc |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['kind']} | {r['lr']} | {r['grad_clip']:g} | {r['clip_fraction']:.0%} | {r['grad_norm']:.2f} | "
              f"{r['first_val_loss']:.3f} | {r['best_val_acc']:.4f} |" for r in report["runs"].values()]
    text = "\n".join(lines) + "\n"
    (RESULTS / "clipping.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
