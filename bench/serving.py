"""Served throughput and latency against in-process ONNX Runtime on the same batches.

Starts `reprotune serve` on a free loopback port (one replica, this machine's cores as its ONNX Runtime
threads), then, at each concurrency level, keeps that many requests of one image (binary FP32, as
tritonclient sends it) in flight for a fixed number of requests, and records each request's latency.
In-process ONNX Runtime, with the same threads, runs the model on batches of the same size as the
concurrency (what the server's batching can at best form). Each reply says the size of the batch it
ran in: the table's mean server batch.

Two models: the workspace's export (the demo's: ResNet18 computing at 32 px, where the server's own
per-request cost dominates; random weights without one), and a ResNet18 that resizes its 32 px input
to 224 px inside the model (`model.image_size: 224`, the classic transfer setting; random weights,
since speed does not depend on their values), where the model's compute dominates.

    python bench/serving.py [--model models/model.onnx] [--requests 600]

The client runs on the same machine and takes CPU from the server: the figures are a floor. Writes
bench/results/serving.json and bench/results/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np

from reprotune.inference.modelcard import load_card
from reprotune.inference.runtime import onnx_runner

RESULTS = Path(__file__).parent / "results"
LEVELS = (1, 8, 32)
MAX_BATCH = 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port, metrics = free_port(), free_port()
    command = [str(Path(sys.executable).parent / "reprotune"), "serve", "--model", str(model), "--port", str(port),
               "--metrics-port", str(metrics), "--threads", str(threads), "--max-batch-size", str(MAX_BATCH)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"serving bench: the server exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
    proc.kill()
    sys.exit("serving bench: the server did not become ready within 180 s")


def request_body(image: np.ndarray) -> tuple[bytes, dict]:
    """One image as tritonclient sends it: JSON header + raw FP32 (the binary extension)."""
    header = json.dumps({"inputs": [{"name": "image", "shape": list(image.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": image.nbytes}}],
                         "outputs": [{"name": "top_k_labels"}]}).encode()
    return header + image.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                      "Content-Type": "application/octet-stream"}


async def load(url: str, body: bytes, headers: dict, concurrency: int, requests: int
               ) -> tuple[list[float], list[int], float]:
    """`requests` requests, `concurrency` at a time: (latencies in seconds, the size of the batch each
    ran in, per the reply, wall seconds)."""
    latencies: list[float] = []
    batches: list[int] = []
    remaining = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker():
            for _ in remaining:
                started = time.perf_counter()
                async with session.post(f"{url}/v2/models/reprotune/infer", data=body, headers=headers) as reply:
                    data = await reply.read()
                    if reply.status != 200:
                        raise RuntimeError(f"HTTP {reply.status}: {data[:200]!r}")
                latencies.append(time.perf_counter() - started)
                batches.append(json.loads(data)["parameters"]["batch"])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, batches, time.perf_counter() - started


def in_process(model: Path, images: np.ndarray, threads: int, batch: int, seconds: float = 5.0) -> tuple[float, float]:
    """ONNX Runtime in this process: (images per second, median ms per call) at `batch`."""
    run = onnx_runner(model, threads)
    batch_images = images[:batch]
    run(batch_images)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 10:
        started = time.perf_counter()
        run(batch_images)
        times.append(time.perf_counter() - started)
    return batch * len(times) / sum(times), 1000 * float(np.median(times))


def export_random(folder: Path, image_size: int) -> Path:
    """A random-weight ResNet18 taking 32 px images and computing at `image_size`, with a minimal card."""
    import torch

    from reprotune.config import ModelConfig
    from reprotune.export.formats import export_onnx
    from reprotune.training.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none", image_size=image_size), 10, [0.5] * 3, [0.25] * 3).eval()
    folder.mkdir()
    path = folder / "model.onnx"
    export_onnx(model, torch.rand(2, 3, 32, 32), path, opset=18)
    (folder / "model_card.json").write_text(json.dumps({
        "classes": [f"class{i}" for i in range(10)], "input": {"shape": ["batch", 3, 32, 32]},
        "files": {"onnx": "model.onnx"}}))
    return path


def measure(model: Path, requests: int) -> dict:
    """Served (at each concurrency) and in-process (at the same batch size) figures for one model."""
    size = load_card(model)["size"]
    threads = os.cpu_count() or 1
    images = np.random.default_rng(0).random((MAX_BATCH, 3, size, size), dtype=np.float32)
    body, headers = request_body(images[:1])
    # In-process first, on a quiet machine; then the server, with the client beside it.
    in_proc = {level: in_process(model, images, threads, level) for level in LEVELS}
    proc, url = start_server(model, threads)
    rows = []
    try:
        asyncio.run(load(url, body, headers, 8, 50))  # warm-up
        for concurrency in LEVELS:
            latencies, batches, wall = asyncio.run(load(url, body, headers, concurrency, requests))
            throughput, median = in_proc[concurrency]
            rows.append({"concurrency": concurrency, "served_images_per_second": requests / wall,
                         "p50_ms": 1000 * float(np.percentile(latencies, 50)),
                         "p99_ms": 1000 * float(np.percentile(latencies, 99)),
                         "mean_batch": float(np.mean(batches)),
                         "in_process_images_per_second": throughput, "in_process_batch_ms": median,
                         "served_fraction": requests / wall / throughput})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(180)
    return {"threads": threads, "rows": rows, "goal_met": rows[-1]["served_fraction"] >= 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--requests", type=int, default=600, help="requests per concurrency level")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    report = {"cores": os.cpu_count(), "requests": args.requests, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = {f"{args.model} (computes at {_compute_size(args.model)} px)": args.model} if args.model.is_file() \
            else {"ResNet18 computing at 32 px (random weights; no trained model found)":
                  export_random(Path(tmp, "32"), 32)}
        models["ResNet18 computing at 224 px (random weights)"] = export_random(Path(tmp, "224"), 224)
        for name, path in models.items():
            print(f"measuring {name} ...", flush=True)
            report["models"][name] = measure(path, args.requests)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| model | concurrency | served img/s | p50 ms | p99 ms | mean server batch "
             "| in-process img/s (same batch) | served / in-process |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, result in report["models"].items():
        lines += [f"| {name} | {r['concurrency']} | {r['served_images_per_second']:.0f} | {r['p50_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} | {r['mean_batch']:.1f} | {r['in_process_images_per_second']:.0f} | "
                  f"{r['served_fraction']:.0%} |" for r in result["rows"]]
    goals = "; ".join(f"{name}: {'met' if r['goal_met'] else 'not met'}" for name, r in report["models"].items())
    text = ("\n".join(lines) + f"\n\nOne replica with {os.cpu_count()} ONNX Runtime threads, one image per request, "
            f"{args.requests} requests per level, the client on the same {os.cpu_count()}-core machine. "
            f"Goal (at concurrency 32, served >= 50% of in-process at batch 32): {goals}.\n"
            f"Command: `python bench/serving.py --requests {args.requests}`\n")
    (RESULTS / "serving.md").write_text(text)
    print(text)


def _compute_size(model: Path) -> int:
    card = json.loads((model.parent / "model_card.json").read_text())
    return card.get("training", {}).get("model", {}).get("image_size", load_card(model)["size"])


if __name__ == "__main__":
    main()
