"""DVC stage `export`: ONNX, int8 ONNX, TorchScript and (export.executorch) ExecuTorch, each verified,
plus the model card.

The compress stage's model, when it pruned one, is exported too: ONNX and int8 ONNX in models/compressed/,
unless it missed compress.max_acc_drop: then that folder holds only rejected.json, with one warning line.
"""

import sys
from pathlib import Path

from reprotune.config import load_params
from reprotune.data.splits import load_split
from reprotune.entrypoint import ParamsFile, run_stage
from reprotune.export.card import lineage, model_card
from reprotune.export.release import ExportPaths, export_all, export_metrics, log_export
from reprotune.files import write_json
from reprotune.tracking import tensorboard
from reprotune.training.model import load_model

MODEL, COMPRESSED = Path("models/model.pt"), Path("models/model.compressed.pt")
PATHS = ExportPaths(onnx=Path("models/model.onnx"), int8=Path("models/int8"),
                    torchscript=Path("models/model.torchscript.pt"), compressed=Path("models/compressed"),
                    executorch=Path("models/executorch"))


def main(params: ParamsFile = Path("params.yaml")) -> None:
    cfg = load_params(params)
    model, saved = load_model(MODEL)
    compressed, compressed_saved = load_model(COMPRESSED)
    if not compressed_saved.get("compression"):  # compress.ratio 0: a copy of the model, nothing to export
        compressed, compressed_saved = None, None
    test, train = load_split(Path("data/processed/test.pt")), load_split(Path("data/processed/train.pt"))
    with tensorboard.stage_writer("runs/export") as writer:
        verdict = compressed_saved["compression"].get("verdict") if compressed_saved else None
        report = export_all(model, test, train.images, cfg.export, PATHS, compressed, verdict)
        log_export(writer, report)
    write_json("models/model_card.json", model_card(saved, report, lineage(Path("dvc.lock"), MODEL), compressed_saved))
    write_json("metrics/export.json", export_metrics(report))
    onnx, int8, script = report["onnx"], report["onnx_int8"], report["torchscript"]
    print(f"onnx |diff| {onnx['max_abs_diff']:.1e} acc {onnx['test_acc']:.4f}; int8 acc {int8['test_acc']:.4f}, "
          f"{int8['size_ratio']:.2f}x size, {int8['speedup']:.2f}x speed; "
          f"torchscript |diff| {script['max_abs_diff']:.1e}")
    if "executorch" in report:
        pte, pte8 = report["executorch"], report["executorch_int8"]
        print(f"executorch |diff| {pte['max_abs_diff']:.1e} acc {pte['test_acc']:.4f}; "
              f"int8 acc {pte8['test_acc']:.4f}, {pte8['size_ratio']:.2f}x size, {pte8['speedup']:.2f}x speed")
    if "compressed" in report:
        small = report["compressed"]
        print(f"compressed onnx |diff| {small['max_abs_diff']:.1e} acc {small['test_acc']:.4f}, "
              f"{small['bytes'] / onnx['bytes']:.2f}x size, {onnx['latency_ms'] / small['latency_ms']:.2f}x speed")
    if "warning" in report:
        print(f"reprotune: warning: {report['warning']}", file=sys.stderr)


if __name__ == "__main__":
    run_stage(main)
