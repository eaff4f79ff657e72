"""DVC stage `evaluate`: test-set accuracy, loss, macro F1, per-class accuracy and confusion rows."""

from pathlib import Path

from reprotune import tb
from reprotune.cli import ParamsFile, run_stage
from reprotune.config import load_params
from reprotune.data import load_split
from reprotune.evaluate import evaluate_model
from reprotune.io import atomic_file, write_json
from reprotune.model import load_model

MODEL = Path("models/model.pt")
TEST = Path("data/processed/test.pt")


def main(params: ParamsFile = Path("params.yaml")) -> None:
    cfg = load_params(params)
    model, _ = load_model(MODEL)
    with tb.stage_writer("runs/evaluate") as writer:
        metrics, rows = evaluate_model(model, load_split(TEST), cfg.evaluate.batch_size, writer)
    with atomic_file("metrics/confusion.csv") as tmp:
        rows.to_csv(tmp, index=False)
    write_json("metrics/evaluate.json", metrics)
    print(f"test acc {metrics['test_acc']:.4f}, loss {metrics['test_loss']:.4f}, macro F1 {metrics['macro_f1']:.4f}")


if __name__ == "__main__":
    run_stage(main)
