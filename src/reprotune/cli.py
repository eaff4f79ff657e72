"""The `reprotune` command: helpers around the DVC pipeline (the stages themselves live in stages/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from reprotune.errors import ReprotuneError, run_cli
from reprotune.stage import ParamsFile

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="reprotune: a reproducible fine-tuning pipeline (run the stages with `dvc repro`).")


@cli.callback()
def _main() -> None:
    """reprotune: a reproducible fine-tuning pipeline (run the stages with `dvc repro`)."""


# The offline demo: the synthetic dataset, random initial weights and a CPU-sized run, applied
# with `dvc exp run -S` so the real job in params.yaml stays as it is.
DEMO_OVERRIDES = [
    "data.dataset=synthetic",
    "data.synthetic_train=5000",  # images; CIFAR-10 has 50,000
    "data.synthetic_test=1000",
    "model.weights=none",  # ImageNet weights need a network
    "train.epochs=3",
    "train.batch_size=64",
    "train.lr=0.05",  # per batch of 64; from scratch wants more than fine-tuning's 0.01
]


@cli.command()
def demo(params: ParamsFile = Path("params.yaml")) -> None:
    """Run the whole DAG offline on the synthetic dataset as a DVC experiment."""
    dvc = shutil.which("dvc", path=_venv_path())
    if dvc is None:
        raise ReprotuneError("dvc is not installed in this environment (run `make install`)")
    original = params.read_bytes() if params.exists() else None
    command = [dvc, "exp", "run", *(arg for o in DEMO_OVERRIDES for arg in ("-S", o))]
    print("$ dvc exp run " + " ".join(f"-S {o}" for o in DEMO_OVERRIDES), flush=True)
    try:
        # DVC runs each stage's `python` through the shell: this environment's must come first.
        code = subprocess.call(command, env={**os.environ, "PATH": _venv_path()})
    finally:
        if original is not None and params.read_bytes() != original:
            params.write_bytes(original)  # the experiment's values stay recorded by `dvc exp show`
    if code != 0:
        raise ReprotuneError(f"dvc exp run failed (exit {code}); see its output above")
    print("demo done: results in metrics/, models/, runs/ (`make tensorboard`), and `dvc exp show`; "
          f"{params} is unchanged")


@cli.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, ...) or directories of them.")],
    model: Annotated[Path, typer.Option(help="An exported model: .onnx (ONNX Runtime) or .torchscript.pt.")]
    = Path("models/model.onnx"),
    top_k: Annotated[int, typer.Option(min=1, help="Classes to list per image.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 64,
) -> None:
    """Classify images; one JSON line per image on stdout, one error line per bad file on stderr."""
    from reprotune.predict import classify, load_predictor  # keeps `reprotune demo` light

    predictor = load_predictor(model)
    failed = 0
    for _, result, error in classify(images, predictor, min(top_k, len(predictor.classes)), batch_size):
        if error is not None:
            failed += 1
            print(f"reprotune: error: {error}", file=sys.stderr, flush=True)
        else:
            print(json.dumps(result), flush=True)
    if failed:
        raise typer.Exit(1)


def _venv_path() -> str:
    """PATH with this interpreter's bin directory first."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def app() -> None:
    """Console-script entry point."""
    run_cli(cli)
