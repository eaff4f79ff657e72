"""Inference speed of every serving format, measured side by side in one run.

PyTorch eager, TorchScript, ONNX Runtime fp32 and int8 (static, QDQ), and, with the `mobile` extra,
ExecuTorch's XNNPACK programs fp32 and int8 (PT2E), as export writes them (planned for batch 256
here): median latency of one image (batch 1) and throughput at batch 256. The rounds interleave the formats so that
machine noise hits them alike: compare the ratios, not the absolute times of different runs.

    python bench/inference.py [--model models/model.pt] [--rounds 5]

Without a trained model it times a ResNet18 with random weights (speed does not depend on the
values). Writes bench/results/inference.json and bench/results/inference.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from reprotune.config import ModelConfig
from reprotune.errors import ReprotuneError
from reprotune.export import phone
from reprotune.export.formats import export_onnx, export_torchscript, quantize_int8
from reprotune.export.release import LATENCY_WARMUP
from reprotune.inference.runtime import executorch_runner, onnx_runner, torchscript_runner
from reprotune.training.model import build_model, load_model

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return (f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"onnxruntime {onnxruntime.__version__}")


def timed(run, images: np.ndarray, repeats: int) -> list[float]:
    # Warm-up as the export stage does: TorchScript's profiling executor re-optimizes for each batch size
    # on its first calls at it (hundreds of ms each on 2 cores), and the rounds alternate batch sizes.
    for _ in range(LATENCY_WARMUP):
        run(images)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.model.is_file():
        model, _ = load_model(args.model)
        source = str(args.model)
    else:
        torch.manual_seed(0)
        model = build_model(ModelConfig(weights="none"), 10, [0.5] * 3, [0.25] * 3).eval()
        source = "ResNet18, random weights (no trained model found)"
    rng = np.random.default_rng(0)
    single = rng.random((1, 3, 32, 32), dtype=np.float32)
    batch = rng.random((256, 3, 32, 32), dtype=np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        onnx, int8, script = Path(tmp, "m.onnx"), Path(tmp, "m.int8.onnx"), Path(tmp, "m.ts.pt")
        export_onnx(model, torch.from_numpy(batch[:2]), onnx, opset=18)
        quantize_int8(onnx, int8, torch.from_numpy((batch * 255).round().astype(np.uint8)))  # uint8, as the cache holds
        export_torchscript(model, torch.from_numpy(batch[:2]), script)

        def eager(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(images)).numpy()

        runners = {"PyTorch eager": eager, "TorchScript": torchscript_runner(script),
                   "ONNX Runtime fp32": onnx_runner(onnx), "ONNX Runtime int8": onnx_runner(int8)}
        try:
            phone.require_executorch()
        except ReprotuneError as error:
            print(f"skipping ExecuTorch: {error}")
        else:
            pte, pte8 = Path(tmp, "m.pte"), Path(tmp, "m.int8.pte")
            phone.export_pte(model, torch.from_numpy(batch[:2]), pte, len(batch))
            phone.quantize_pte(model, torch.from_numpy(batch[:2]), pte8, torch.from_numpy(batch), len(batch))
            runners["ExecuTorch XNNPACK fp32"] = executorch_runner(pte)
            runners["ExecuTorch XNNPACK int8"] = executorch_runner(pte8)
        latency = {name: [] for name in runners}
        throughput = {name: [] for name in runners}
        for _ in range(args.rounds):  # interleaved: each round times every format
            for name, run in runners.items():
                latency[name] += timed(run, single, repeats=20)
                throughput[name] += [len(batch) / t for t in timed(run, batch, repeats=2)]

    base = statistics.median(latency["PyTorch eager"])
    rows = [{"format": name, "latency_ms": 1000 * statistics.median(latency[name]),
             "throughput_images_per_s": statistics.median(throughput[name]),
             "latency_speedup_vs_eager": base / statistics.median(latency[name]),
             "throughput_speedup_vs_eager": statistics.median(throughput[name])
             / statistics.median(throughput["PyTorch eager"])} for name in runners]
    report = {"machine": machine(), "model": source, "input": "float32 (N, 3, 32, 32)",
              "rounds": args.rounds, "results": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps(report, indent=2) + "\n")
    table = ["| format | batch-1 latency (ms) | batch-256 throughput (images/s) | latency vs eager "
             "| throughput vs eager |",
             "| --- | ---: | ---: | ---: | ---: |"]
    table += [f"| {r['format']} | {r['latency_ms']:.3f} | {r['throughput_images_per_s']:,.0f} | "
              f"{r['latency_speedup_vs_eager']:.2f}x | {r['throughput_speedup_vs_eager']:.2f}x |" for r in rows]
    text = (f"# Inference benchmark\n\nMachine: {report['machine']}  \nModel: {source}  \n"
            f"Command: `python bench/inference.py --rounds {args.rounds}`\n\n" + "\n".join(table) + "\n")
    (RESULTS / "inference.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
