"""DVC stage `export`: ONNX and TorchScript, each checked against PyTorch, plus the model card."""

from pathlib import Path

from reprotune import tb
from reprotune.cli import ParamsFile, run_stage
from reprotune.config import load_params
from reprotune.data import load_split
from reprotune.export import export_all, log_export, model_card
from reprotune.io import write_json
from reprotune.model import load_model

MODEL = Path("models/model.pt")
TEST = Path("data/processed/test.pt")


def main(params: ParamsFile = Path("params.yaml")) -> None:
    cfg = load_params(params)
    model, saved = load_model(MODEL)
    with tb.stage_writer("runs/export") as writer:
        report = export_all(model, load_split(TEST).images, cfg.export,
                            Path("models/model.onnx"), Path("models/model.torchscript.pt"))
        log_export(writer, report)
    write_json("models/model_card.json", model_card(saved, report))
    write_json("metrics/export.json", report)
    print(f"onnx max |diff| {report['onnx']['max_abs_diff']:.2e}, "
          f"torchscript {report['torchscript']['max_abs_diff']:.2e}")


if __name__ == "__main__":
    run_stage(main)
