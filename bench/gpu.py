"""The training loop on a GPU: against a bare loop and the textbook recipe, at 32 and 224 px.

    python bench/gpu.py [--quick] [--device cuda]

Run by `make gpu-check` (bench/gpu_check.sh) on a machine with a GPU; `--quick --device cpu` is a
smoke run of the same code. On a CIFAR-10-sized synthetic training set (45,000 + 5,000 validation
images), ResNet18 from random weights (the same FLOPs as ImageNet's), batch 128, fp16 autocast:

1. loop vs bare: `finetune` (augmentation on the device, gradient clipping and statistics, progress,
   divergence checks) against a bare forward/backward/step loop over float batches already on the
   GPU: same model, SGD, fp16 autocast with GradScaler, channels_last. images/s of a whole steady
   epoch (the second), timed to the end of its GPU work.
2. textbook: the tutorial recipe on the same uint8 images: a Dataset with per-sample torchvision
   transforms (crop, flip, resize for 224 px, ToTensor, Normalize), a DataLoader with worker
   processes and pinned memory, batches copied to the GPU; the same model with fp16 autocast.
3. default run: `params.yaml` as shipped (10 epochs) at `model.image_size` 224: seconds of training.

Each row reports images/s, the TFLOP/s achieved (FLOPs counted by torch), their share of the GPU's
dense fp16 tensor-core peak, and peak GPU memory. Writes bench/results/gpu.json and gpu.md after
each section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from reprotune.config import ModelConfig, Params
from reprotune.data.splits import Split, make_splits, to_float
from reprotune.data.synthetic import synthetic_raw
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.loop import finetune, training_flops_per_image
from reprotune.training.model import build_model

RESULTS = Path(__file__).parent / "results"
BATCH = 128
# Dense (no sparsity) fp16/bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
DENSE_FP16_PEAK = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "H100": 989.4,
                   "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 125.0, "RTX 4090": 165.2}
GOALS = {"loop_vs_bare": 0.95, "loop_vs_textbook": 3.0, "default_224_train_seconds": 180.0}


def synthetic_splits(n_train: int, n_val: int) -> dict[str, Split]:
    """Train and val from one synthetic draw (no test split: speed is measured on train and val)."""
    return make_splits(synthetic_raw(n_train + n_val, 0, seed=0), n_val / (n_train + n_val), seed=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: a sync point, so the clock sees the queued GPU work


def peak_memory(device: torch.device, reset: bool = False) -> float | None:
    """Peak GPU memory allocated since the last reset, MiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def loop(splits, size: int, epochs: int, device: torch.device, workdir: Path, **train) -> dict:
    """reprotune's finetune: its own images/s over the last epoch's training steps."""
    params = Params.model_validate({
        "model": {"weights": "none", "image_size": size},
        "train": {"epochs": epochs, "batch_size": BATCH, "device": str(device), **train},
        "log": {"graph": False, "images": 0, "histograms": False}})
    peak_memory(device, reset=True)
    result = finetune(params, splits["train"], splits["val"], Checkpoints(workdir, "bench"))
    last = result.history[-1]
    return {"images_per_s": last["images_per_second"], "train_seconds": result.metrics["train_seconds"],
            "epochs": result.metrics["epochs"], "peak_gpu_mib": peak_memory(device),
            "final_train_loss": result.metrics["final_train_loss"], "best_val_acc": result.metrics["best_val_acc"]}


def bare(splits, size: int, device: torch.device) -> dict:
    """Forward, backward and SGD step on float batches prepared on the device: the ceiling."""
    torch.manual_seed(0)
    train = splits["train"]
    model = build_model(ModelConfig(weights="none", image_size=size), 10, train.mean, train.std)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    steps = len(train.labels) // BATCH
    images, labels = train.images[:steps * BATCH].to(device), train.labels[:steps * BATCH].to(device)
    batches = [(to_float(images[i:i + BATCH]).contiguous(memory_format=torch.channels_last), labels[i:i + BATCH])
               for i in range(0, steps * BATCH, BATCH)]
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def epoch(batches) -> None:
        for x, y in batches:
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    peak_memory(device, reset=True)
    epoch(batches[:20])  # warm-up: cuDNN's algorithm choice, the allocator's pools
    sync(device)
    started = time.perf_counter()
    epoch(batches)
    sync(device)
    return {"images_per_s": steps * BATCH / (time.perf_counter() - started), "peak_gpu_mib": peak_memory(device)}


class _Images(torch.utils.data.Dataset):
    """uint8 (N, 3, 32, 32) arrays served one PIL image at a time, as torchvision's CIFAR10 does."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i].transpose(1, 2, 0))), int(self.labels[i])


def textbook(splits, size: int, device: torch.device, steps: int) -> dict:
    """The tutorial recipe: per-sample transforms in DataLoader workers, pinned batches to the GPU."""
    train = splits["train"]
    ops = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    if size != 32:
        ops.append(transforms.Resize(size, antialias=True))
    ops += [transforms.ToTensor(), transforms.Normalize(train.mean, train.std)]
    dataset = _Images(train.images.numpy(), train.labels.numpy(), transforms.Compose(ops))
    workers = min(8, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    peak_memory(device, reset=True)
    warmup, seen, started = 10, 0, None
    for step, (x, y) in enumerate(loader):
        if step == warmup:  # after the workers' start and cuDNN's first choices
            sync(device)
            started = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if step >= warmup:
            seen += len(y)
        if step == warmup + steps - 1:
            break
    sync(device)
    return {"images_per_s": seen / (time.perf_counter() - started), "workers": workers,
            "peak_gpu_mib": peak_memory(device)}


def flops_per_image(size: int, device: torch.device) -> float:
    model = build_model(ModelConfig(weights="none", image_size=size), 10, [0.5] * 3, [0.25] * 3).to(device)
    return training_flops_per_image(model, 32, device)


def with_compute(row: dict, flops: float, peak: float | None) -> dict:
    tflops = flops * row["images_per_s"] / 1e12
    return {**row, "tflops": tflops, "share_of_peak": tflops / peak if peak else None}


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in DENSE_FP16_PEAK.items() if k in name), None)
        info.update(gpu=name, dense_fp16_peak_tflops=peak, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every section")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    n_train, n_val = (2560, 256) if args.quick else (45_000, 5_000)
    sizes = (32, 64) if args.quick else (32, 224)
    report = {"machine": machine(device), "batch_size": BATCH, "train_images": n_train, "goals": GOALS,
              "command": "python bench/gpu.py" + (" --quick" if args.quick else ""), "sizes": {}}
    peak = report["machine"].get("dense_fp16_peak_tflops")
    splits = synthetic_splits(n_train, n_val)
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            print(f"model.image_size {size}: flops", flush=True)
            flops = flops_per_image(size, device)
            row = {"training_gflops_per_image": flops / 1e9}
            print(f"model.image_size {size}: finetune loop", flush=True)
            row["loop"] = with_compute(loop(splits, size, 2, device, Path(tmp) / f"loop{size}", channels_last=True),
                                       flops, peak)
            print(f"model.image_size {size}: bare loop", flush=True)
            row["bare"] = with_compute(bare(splits, size, device), flops, peak)
            print(f"model.image_size {size}: textbook recipe", flush=True)
            row["textbook"] = with_compute(textbook(splits, size, device, 5 if args.quick else 150), flops, peak)
            row["loop_vs_bare"] = row["loop"]["images_per_s"] / row["bare"]["images_per_s"]
            row["loop_vs_textbook"] = row["loop"]["images_per_s"] / row["textbook"]["images_per_s"]
            report["sizes"][str(size)] = row
            write(report)
        size = sizes[-1]
        print(f"default run ({'2' if args.quick else '10'} epochs) at model.image_size {size}", flush=True)
        default = loop(splits, size, 2 if args.quick else 10, device, Path(tmp) / "default")
        report["default_run"] = {"image_size": size, **with_compute(default, flops_per_image(size, device), peak)}
        write(report)


def write(report: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    gpu = f"{m.get('gpu', 'no GPU (CPU smoke run)')}, torch {m['torch']}, CUDA {m.get('cuda')}, {m['cpus']} CPUs"
    lines = ["# GPU training benchmark", "", f"Machine: {gpu}  ", f"Command: `{report['command']}` "
             f"(batch {report['batch_size']}, {report['train_images']:,} training images)", "",
             "| image size | run | images/s | TFLOP/s | share of dense fp16 peak | peak GPU MiB |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]

    def cells(r: dict) -> str:
        share = f"{r['share_of_peak']:.1%}" if r.get("share_of_peak") is not None else "-"
        memory = f"{r['peak_gpu_mib']:.0f}" if r.get("peak_gpu_mib") is not None else "-"
        return f"{r['images_per_s']:,.0f} | {r['tflops']:.1f} | {share} | {memory} |"

    for size, row in report["sizes"].items():
        for name, label in (("loop", "reprotune finetune loop"), ("bare", "bare loop (ceiling)"),
                            ("textbook", "textbook DataLoader recipe")):
            lines.append(f"| {size} | {label} | {cells(row[name])}")
    lines += ["", "| image size | loop / bare (goal >= 0.95) | loop / textbook (goal >= 3) |", "| ---: | ---: | ---: |"]
    lines += [f"| {size} | {row['loop_vs_bare']:.3f} | {row['loop_vs_textbook']:.2f} |"
              for size, row in report["sizes"].items()]
    if "default_run" in report:
        d = report["default_run"]
        lines += ["", f"Default run (params.yaml's train section, {d['epochs']} epochs) at {d['image_size']} px: "
                      f"{d['train_seconds']:.1f} s of training (goal < 180 s), {d['images_per_s']:,.0f} images/s in "
                      f"its last epoch, best val acc {d['best_val_acc']:.3f}."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "gpu.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
