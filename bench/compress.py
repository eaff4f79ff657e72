"""What structured pruning buys on the demo's data: accuracy, size and speed at several ratios.

    python bench/compress.py [--ratios 0.1 0.2 0.3] [--epochs 3] [--importance magnitude] [--distill 0]

Trains the demo's model (`reprotune demo`'s settings: synthetic data, 5,000 training and 1,000 test
images, 3 epochs at batch 64, lr 0.05, no pretrained weights), then runs the compress stage's own
function at each ratio: prune, recover for `--epochs` through the finetune loop, and measure before and
after as the stage does (test accuracy in PyTorch; ONNX Runtime batch-1 latency and batch-256
throughput on this machine's CPU). The first row is the control: ratio 0, the same recovery epochs,
so the accuracy change of each ratio can be read against what the extra epochs alone give. The
speed columns come from one final round-robin over every model (the stage's own `speed`), so the
ratios between rows are measured side by side, not minutes apart.
Writes bench/results/compress.json and bench/results/compress.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from reprotune import data
from reprotune.checkpoint import Checkpoints
from reprotune.compress import compress, speed
from reprotune.config import Params
from reprotune.export import export_onnx
from reprotune.train import finetune

RESULTS = Path(__file__).parent / "results"
DEMO = {"model": {"weights": "none"}, "train": {"epochs": 3, "batch_size": 64, "lr": 0.05, "device": "cpu"},
        "log": {"graph": False, "histograms": False, "images": 0}}


def demo_splits(n_train: int = 5000, n_test: int = 1000) -> dict[str, data.Split]:
    """The demo's data: synthetic images, 10% of the training ones held out for validation."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(n_train) % 10)
    test_labels = rng.permutation(np.arange(n_test) % 10)
    raw = data.RawData(data.synthetic_images(labels, rng).reshape(-1, 3, 32, 32), labels,
                       data.synthetic_images(test_labels, rng).reshape(-1, 3, 32, 32), test_labels,
                       data.SYNTHETIC_CLASSES)
    return data.make_splits(raw, 0.1, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--epochs", type=int, default=3, help="recovery epochs (compress.epochs)")
    parser.add_argument("--importance", default="magnitude")
    parser.add_argument("--distill", type=float, default=0.0)
    args = parser.parse_args()
    splits = demo_splits()
    rows, onnx = [], []
    with tempfile.TemporaryDirectory() as tmp:
        base = finetune(Params.model_validate(DEMO), splits["train"], splits["val"],
                        Checkpoints(Path(tmp) / "base", "base"))
        for ratio in [0.0, *args.ratios]:
            params = Params.model_validate({**DEMO, "compress": {"ratio": ratio, "epochs": args.epochs,
                                                                 "importance": args.importance,
                                                                 "distill": args.distill}})
            model, metrics = compress(params, base.model, splits["train"], splits["val"], splits["test"],
                                      Checkpoints(Path(tmp) / f"r{ratio}", f"r{ratio}"))
            rows.append(metrics)
            onnx.append(Path(tmp) / f"r{ratio}.onnx")
            export_onnx(model, data.to_float(splits["test"].images[:2]), onnx[-1], opset=18)
            print(f"ratio {ratio}: {metrics['flops_ratio']:.2f}x FLOPs, {metrics['speedup']:.2f}x throughput, "
                  f"test acc {metrics['test_acc']:.4f} ({metrics['acc_change']:+.4f})", flush=True)
        unpruned = Path(tmp) / "unpruned.onnx"
        export_onnx(base.model.eval(), data.to_float(splits["test"].images[:2]), unpruned, opset=18)
        first, *timed = speed([unpruned, *onnx], splits["test"])
    for m, t in zip(rows, timed, strict=True):  # the side-by-side figures replace each call's own pair
        m["after"].update(t)
        m["speedup"] = t["images_per_second"] / first["images_per_second"]
    RESULTS.mkdir(exist_ok=True)
    first = {**rows[0]["before"], **first}  # the unpruned model
    (RESULTS / "compress.json").write_text(json.dumps({"args": vars(args), "unpruned": first, "runs": rows},
                                                      indent=2) + "\n")
    command = (f"python bench/compress.py --ratios {' '.join(str(r) for r in args.ratios)} --epochs {args.epochs} "
               f"--importance {args.importance} --distill {args.distill}")
    # Each speedup is against the unpruned model, timed in the same round-robin.
    lines = [f"Demo data, `{command}`; ONNX Runtime on this machine's CPU ({os.cpu_count()} cores).", "",
             "| compress.ratio | FLOPs | parameters | ONNX MB | batch-1 ms | batch-256 img/s | test acc | "
             "acc change | acc before recovery |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| 0 (unpruned) | {first['flops'] / 1e6:.1f} M | {first['parameters'] / 1e6:.2f} M | "
             f"{first['size_mb']:.1f} | {first['latency_ms']:.2f} | {first['images_per_second']:,.0f} | "
             f"{first['test_acc']:.4f} | | |"]
    rows[0]["ratio"] = "0, recovery epochs only (control)"
    for m in rows:
        after = m["after"]
        lines.append(f"| {m['ratio']} | {after['flops'] / 1e6:.1f} M ({m['flops_ratio']:.2f}x) | "
                     f"{after['parameters'] / 1e6:.2f} M | {after['size_mb']:.1f} | {after['latency_ms']:.2f} | "
                     f"{after['images_per_second']:,.0f} ({m['speedup']:.2f}x) | {after['test_acc']:.4f} | "
                     f"{m['acc_change']:+.4f} | {m['pruned_test_acc']:.4f} |")
    (RESULTS / "compress.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
