"""DVC stage `compress`: prune whole channels of the fine-tuned model, fine-tune it back, measure both.

With compress.ratio 0 (the default) nothing is pruned: the model is copied as it is, without loading
torch, in about a second, and runs/compress/ holds a note instead of a TensorBoard run. A compressed
model that lost more than compress.max_acc_drop test accuracy is written marked rejected, with one
warning line (export then leaves it out), or, with compress.gate required, fails the stage.
"""

import shutil
import sys
from pathlib import Path

from reprotune.config import ModelConfig, load_params
from reprotune.entrypoint import ParamsFile, run_stage
from reprotune.files import atomic_dir, atomic_file, write_json

MODEL, OUT = Path("models/model.pt"), Path("models/model.compressed.pt")
SPLITS = [Path(f"data/processed/{split}.pt") for split in ("train", "val", "test")]
WORK = Path("runs/compress.live")  # checkpoint + live log; not a DVC output, so a rerun resumes


def main(params: ParamsFile = Path("params.yaml")) -> None:
    cfg = load_params(params)
    if not cfg.compress.ratio:
        with atomic_file(OUT) as tmp:
            shutil.copyfile(MODEL, tmp)  # the same bytes: DVC caches them once
        with atomic_dir("runs/compress") as tmp:
            (tmp / "README.txt").write_text("compress.ratio is 0: the model was copied, not pruned.\n")
        write_json("metrics/compress.json", {"ratio": 0.0})
        print(f"{OUT}: a copy of {MODEL} (compress.ratio is 0)")
        return
    from reprotune.data.splits import load_split
    from reprotune.export.compress import compress, log_compress, recovery_key
    from reprotune.tracking import tensorboard  # torch, the pruner and the training loop: only when there is work
    from reprotune.training.checkpoint import Checkpoints
    from reprotune.training.model import load_model, save_model

    model, saved = load_model(MODEL)
    train, val, test = (load_split(path) for path in SPLITS)
    checkpoints = Checkpoints(WORK, recovery_key(cfg, [MODEL, *SPLITS]))
    pruned, metrics, verdict = compress(cfg, model, train, val, test, checkpoints)
    checkpoints.logdir.mkdir(parents=True, exist_ok=True)  # none yet without a recovery fine-tune
    with tensorboard.open_writer(checkpoints.logdir) as writer:
        log_compress(writer, metrics)
    tensorboard.publish(checkpoints.logdir, "runs/compress")
    save_model(OUT, pruned, ModelConfig.model_validate(saved["model"]), saved["classes"], {
        **{key: saved[key] for key in ("seed", "train", "input_size") if key in saved},
        # no recovery fine-tune (compress.epochs 0): no epoch and no validation of its own
        "best_epoch": metrics["recovery"].get("best_epoch"), "val_acc": metrics["recovery"].get("best_val_acc"),
        "compression": {**cfg.compress.model_dump(), "flops_ratio": metrics["flops_ratio"],
                        "accepted": verdict is None, "verdict": verdict}})
    write_json("metrics/compress.json", metrics)
    checkpoints.remove()
    print(f"{OUT}: {metrics['flops_ratio']:.2f}x the FLOPs, {metrics['speedup']:.2f}x the batch-256 ONNX throughput, "
          f"test acc {metrics['after']['test_acc']:.4f} ({metrics['acc_change']:+.4f}; "
          f"{metrics['pruned_test_acc']:.4f} before recovery)")
    if verdict:
        print(f"reprotune: warning: {verdict}: export will leave it out of models/compressed/", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
