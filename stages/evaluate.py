"""DVC stage `evaluate`: accuracy, top-5, per-class precision/recall/F1, calibration, confusion rows,
and the drift reference `reprotune monitor` compares new images with (models/reference.pt)."""

from pathlib import Path

from reprotune.config import load_params
from reprotune.data.splits import load_split
from reprotune.entrypoint import ParamsFile, run_stage
from reprotune.evaluation.reference import build_reference, save_reference
from reprotune.evaluation.report import evaluate_model
from reprotune.files import atomic_file, file_md5, write_json
from reprotune.tracking import tensorboard
from reprotune.training.model import load_model

MODEL = Path("models/model.pt")
TEST, VAL = Path("data/processed/test.pt"), Path("data/processed/val.pt")
REFERENCE = Path("models/reference.pt")


def main(params: ParamsFile = Path("params.yaml")) -> None:
    cfg = load_params(params)
    model, _ = load_model(MODEL)
    with tensorboard.stage_writer("runs/evaluate") as writer:
        result = evaluate_model(model, load_split(TEST), cfg.evaluate, writer)
    for name, frame in (("classes", result.per_class), ("confusion", result.confusion),
                        ("reliability", result.reliability)):
        with atomic_file(f"metrics/{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)
    write_json("metrics/evaluate.json", result.metrics)
    save_reference(build_reference(model, load_split(VAL), result.metrics, file_md5(MODEL)), REFERENCE)
    m = result.metrics
    print(f"test acc {m['test_acc']:.4f} (top-5 {m['test_top5_acc']:.4f}), loss {m['test_loss']:.4f}, "
          f"macro F1 {m['macro_f1']:.4f}, ECE {m['ece']:.4f}")


if __name__ == "__main__":
    run_stage(main)
