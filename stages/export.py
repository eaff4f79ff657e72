"""DVC stage `export`: ONNX, int8 ONNX and TorchScript, each verified, plus the model card."""

import sys
from pathlib import Path

from reprotune import tb
from reprotune.config import load_params
from reprotune.data import load_split
from reprotune.export import ExportPaths, export_all, export_metrics, lineage, log_export, model_card
from reprotune.io import write_json
from reprotune.model import load_model
from reprotune.stage import ParamsFile, run_stage

MODEL = Path("models/model.pt")
PATHS = ExportPaths(onnx=Path("models/model.onnx"), int8=Path("models/int8"),
                    torchscript=Path("models/model.torchscript.pt"))


def main(params: ParamsFile = Path("params.yaml")) -> None:
    cfg = load_params(params)
    model, saved = load_model(MODEL)
    test, train = load_split(Path("data/processed/test.pt")), load_split(Path("data/processed/train.pt"))
    with tb.stage_writer("runs/export") as writer:
        report = export_all(model, test, train.images, cfg.export, PATHS)
        log_export(writer, report)
    write_json("models/model_card.json", model_card(saved, report, lineage(Path("dvc.lock"), MODEL)))
    write_json("metrics/export.json", export_metrics(report))
    onnx, int8, script = report["onnx"], report["onnx_int8"], report["torchscript"]
    print(f"onnx |diff| {onnx['max_abs_diff']:.1e} acc {onnx['test_acc']:.4f}; int8 acc {int8['test_acc']:.4f}, "
          f"{int8['size_ratio']:.2f}x size, {int8['speedup']:.2f}x speed; "
          f"torchscript |diff| {script['max_abs_diff']:.1e}")
    if "warning" in report:
        print(f"reprotune: warning: {report['warning']}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
