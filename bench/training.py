"""How fast reprotune trains, against the compute ceiling and the textbook recipe, and at full scale.

    python bench/training.py [--quick] [--augmentation-only]

1. ceiling:  the finetune loop's images/s (augmentation, gradient statistics and progress
             bookkeeping included) against a bare forward/backward/step loop on batches already in
             memory: same model, batch size, dtype and memory format. Rounds alternate the two.
2. textbook: torchvision's CIFAR10 dataset with per-sample RandomCrop/Flip/ToTensor/Normalize and a
             DataLoader (batch 64, 2 workers), SGD, against reprotune at batch 64 on the same images.
3. stages:   each DVC stage script on a CIFAR-10-sized synthetic archive (50,000 + 10,000 images),
             one training epoch: wall time and peak memory of each process.
4. scaling:  time per epoch and peak memory as the training set grows; memory across epochs.
5. augment:  the share of a training step (batch 128, 32 px, the default model) spent in
             `augment`, with crop and flip only and with rotation and colour jitter on too, timed
             within the same steps. `--augmentation-only` runs this section alone and keeps the
             other sections' last results.

Ratios are measured side by side in one run; absolute times drift between runs on shared machines.
Writes bench/results/training.json and bench/results/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
import yaml
from torchvision import transforms

from reprotune.config import ModelConfig, Params
from reprotune.data.splits import Split, make_splits, to_float
from reprotune.data.synthetic import synthetic_raw, write_synthetic_archive
from reprotune.training.augment import augment
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.loop import finetune, training_flops_per_image
from reprotune.training.model import build_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
PEAK = REPO / "bench" / "peak.py"


def synthetic_splits(n_train: int, n_val: int, seed: int = 0) -> dict[str, Split]:
    """Train and val from one synthetic draw (no test split: speed is measured on train and val)."""
    return make_splits(synthetic_raw(n_train + n_val, 0, seed), n_val / (n_train + n_val), seed)


def reprotune_images_per_second(splits, batch_size: int, epochs: int, workdir: Path) -> float:
    """The finetune loop's own measure: training images over time in training steps, per epoch."""
    params = Params.model_validate({"model": {"weights": "none"},
                                    "train": {"epochs": epochs, "batch_size": batch_size},
                                    "log": {"graph": False, "images": 0}})
    result = finetune(params, splits["train"], splits["val"], Checkpoints(workdir, "bench"))
    return result.history[-1]["images_per_second"]  # the last epoch: steady state, as for the bare loop


def bare_images_per_second(splits, batch_size: int, steps: int) -> float:
    """Forward, backward and SGD step on float batches prepared in advance: the compute ceiling."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), 10, splits["train"].mean, splits["train"].std).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images, labels = to_float(splits["train"].images), splits["train"].labels
    batches = [(images[i:i + batch_size], labels[i:i + batch_size])
               for i in range(0, len(images) - batch_size + 1, batch_size)][:steps]
    for _ in range(2):  # time the second pass: steady state, as for reprotune's last epoch
        started = time.perf_counter()
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return len(batches) * batch_size / (time.perf_counter() - started)


AUGMENT_SETTINGS = {"crop + flip": {"rotation": 0.0, "jitter": 0.0},
                    "crop + flip + rotation 15 + jitter 0.4": {"rotation": 15.0, "jitter": 0.4}}


def augmentation_share(splits, batch_size: int, steps: int) -> dict:
    """Milliseconds per step in `augment` and in the whole step (gather, augment, forward, backward,
    SGD step), and augment's share of each step, for each of AUGMENT_SETTINGS: the settings
    alternate step by step, so drift hits all alike. Medians: a shared machine's stalls are outliers."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(weights="none"), 10, splits["train"].mean, splits["train"].std).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images, labels = splits["train"].images, splits["train"].labels
    generator = torch.Generator().manual_seed(0)
    times = {name: [] for name in AUGMENT_SETTINGS}
    for step in range(steps + 2):  # the first two rounds warm up and are not kept
        for name, settings in AUGMENT_SETTINGS.items():
            started = time.perf_counter()
            idx = torch.randperm(len(images), generator=generator)[:batch_size]
            batch = images[idx]
            gathered = time.perf_counter()
            x = augment(batch, 4, True, generator, **settings)
            augmented = time.perf_counter()
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= 2:
                times[name].append((augmented - gathered, time.perf_counter() - started))
    return {name: {"augment_ms": 1e3 * statistics.median(a for a, _ in rows),
                   "step_ms": 1e3 * statistics.median(s for _, s in rows),
                   "share": statistics.median(a / s for a, s in rows), "steps": len(rows)}
            for name, rows in times.items()}


class _SyntheticCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10 over our synthetic batches (their md5s differ from the official ones)."""

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:  # torchvision's version checks the official md5 first
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]  # our own file: trusted
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def textbook_images_per_second(root: Path, epochs: int = 1) -> float:
    """The common tutorial loop: per-sample transforms in a DataLoader, batch 64, SGD."""
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(),
                                    transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    dataset = _SyntheticCIFAR10(str(root), train=True, transform=transform, download=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=2, drop_last=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seen, started = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(x)
    return seen / (time.perf_counter() - started)


def run_stage(project: Path, stage: str) -> dict:
    """Run one stage script in `project`; its wall time and the process's peak resident memory."""
    out = project / f".peak-{stage}.json"
    started = time.perf_counter()
    subprocess.run([sys.executable, str(PEAK), str(out), f"stages/{stage}.py"], cwd=project, check=True,
                   stdout=subprocess.DEVNULL)
    return {"seconds": time.perf_counter() - started, "peak_mib": json.loads(out.read_text())["peak_mib"]}


def stage_project(root: Path, archive: Path, md5: str, overrides: dict) -> Path:
    root.mkdir(parents=True)
    for name in ("stages", "src"):
        (root / name).symlink_to(REPO / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(url=str(archive), md5=md5)
    params["model"]["weights"] = "none"
    params["export"]["int8_min_agreement"] = 0.5  # a one-epoch model has thin margins; speed is measured here
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--augmentation-only", action="store_true",
                        help="run section 5 alone, keeping the other sections of bench/results/training.json")
    args = parser.parse_args()
    n = 1024 if args.quick else 4096
    full_train, full_test = (5000, 1000) if args.quick else (50_000, 10_000)
    report: dict = {"machine": machine(), "torch_threads": torch.get_num_threads()}
    splits = synthetic_splits(n, 512)
    if args.augmentation_only:
        report = {**json.loads((RESULTS / "training.json").read_text()),
                  "augmentation": augmentation(splits, 10 if args.quick else 40)}
        write(report)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        print("1. training loop vs the bare-loop ceiling", flush=True)
        ours, bare = [], []
        for round_ in range(5):  # alternate, so drift hits both alike; pair each round's figures
            bare.append(bare_images_per_second(splits, 128, n // 128))
            ours.append(reprotune_images_per_second(splits, 128, 2, tmp / f"ceiling{round_}"))
        flops = build_flops()
        report["ceiling"] = {"images": len(splits["train"].labels), "batch_size": 128,
                             "reprotune_images_per_s": statistics.median(ours),
                             "bare_loop_images_per_s": statistics.median(bare),
                             "ratio": statistics.median(o / b for o, b in zip(ours, bare, strict=True)),
                             "rounds": [{"reprotune": o, "bare": b} for o, b in zip(ours, bare, strict=True)],
                             "training_gflops_per_image": flops / 1e9,
                             "achieved_gflops_per_s": flops * statistics.median(ours) / 1e9}

        print("2. against the textbook recipe (batch 64)", flush=True)
        archive = tmp / "small.tar.gz"
        write_synthetic_archive(archive, len(splits["train"].labels), 10, seed=0)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp / "textbook", filter="data")
        textbook = textbook_images_per_second(tmp / "textbook")
        ours64 = reprotune_images_per_second(splits, 64, 1, tmp / "textbook-ours")
        report["textbook"] = {"images": len(splits["train"].labels), "batch_size": 64,
                              "textbook_images_per_s": textbook, "reprotune_images_per_s": ours64,
                              "ratio": ours64 / textbook}

        print(f"3. stages at full scale ({full_train:,} + {full_test:,} images)", flush=True)
        big = tmp / "cifar-sized.tar.gz"
        md5 = write_synthetic_archive(big, full_train, full_test, seed=0)["md5"]
        project = stage_project(tmp / "full", big, md5, {"train.epochs": 1})
        report["stages"] = {stage: run_stage(project, stage)
                            for stage in ("download", "preprocess", "finetune", "evaluate", "export")}
        history = json.loads((project / "metrics/train.json").read_text())
        report["stages"]["finetune"]["images_per_s"] = history["images_per_second"]

        print("4. scaling with the training set, and memory across epochs", flush=True)
        scaling = []
        for size in ((1000, 2000) if args.quick else (5000, 20_000)):
            archive = tmp / f"scale{size}.tar.gz"
            md5 = write_synthetic_archive(archive, round(size / 0.9), 1000, seed=0)["md5"]
            sub = stage_project(tmp / f"scale{size}", archive, md5, {"train.epochs": 3 if size == min(
                (1000, 2000) if args.quick else (5000, 20_000)) else 1})
            for stage in ("download", "preprocess"):
                run_stage(sub, stage)
            scaling.append(_scaling_row(sub, run_stage(sub, "finetune")))
        scaling.append(_scaling_row(project, report["stages"]["finetune"]))
        report["scaling"] = scaling
    report["augmentation"] = augmentation(splits, 10 if args.quick else 40)
    write(report)


def augmentation(splits, steps: int) -> dict:
    print("5. augmentation's share of a training step", flush=True)
    load = os.getloadavg()[0]  # runnable processes, 1-minute average: above the cores, others share them
    return {"machine": machine(), "torch_threads": torch.get_num_threads(), "load_average": load,
            "batch_size": 128, "image_size": 32, "settings": augmentation_share(splits, 128, steps)}


def _scaling_row(project: Path, finetune: dict) -> dict:
    rows = pd.read_csv(project / "metrics/train_history.csv").to_dict("records")
    labels = torch.load(project / "data/processed/train.pt", weights_only=True)["labels"]
    return {"train_images": len(labels), "epoch_seconds": rows[-1]["seconds"], "peak_mib": finetune["peak_mib"],
            "rss_by_epoch_mib": [row["peak_rss_mb"] for row in rows]}


def build_flops() -> float:
    model = build_model(ModelConfig(weights="none"), 10, [0.5] * 3, [0.25] * 3)
    return training_flops_per_image(model, 32, torch.device("cpu"))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, no GPU" if not torch.cuda.is_available() \
        else f"{cpu}, {os.cpu_count()} cores, {torch.cuda.get_device_name()}"


def _augmentation_lines(a: dict) -> list[str]:
    lines = ["", f"Augmentation's share of a training step: batch {a['batch_size']}, {a['image_size']} px, ResNet18 "
             f"(default stem), fp32, {a['torch_threads']} threads, load average {a['load_average']:.1f} at the "
             f"start; medians of {next(iter(a['settings'].values()))['steps']} steps each, the "
             "settings alternating; share: the median over steps of time in `augment` / time of the step. This "
             "table alone: "
             "`python bench/training.py --augmentation-only`.", "",
             "| augmentation | augment (ms) | whole step (ms) | share | goal |", "| --- | ---: | ---: | ---: | --- |"]
    return lines + [f"| {name} | {s['augment_ms']:.2f} | {s['step_ms']:.1f} | {s['share']:.2%} | < 5% |"
                    for name, s in a["settings"].items()]


def write(report: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    c, t = report["ceiling"], report["textbook"]
    lines = ["# Training benchmark", "", f"Machine: {report['machine']}  ", "Command: `python bench/training.py`",
             "", "| comparison | reprotune (images/s) | other (images/s) | ratio | goal |",
             "| --- | ---: | ---: | ---: | --- |",
             f"| finetune loop vs bare loop, batch {c['batch_size']} | {c['reprotune_images_per_s']:.0f} | "
             f"{c['bare_loop_images_per_s']:.0f} | {c['ratio']:.3f} | >= 0.95 |",
             f"| vs textbook DataLoader recipe, batch {t['batch_size']} | {t['reprotune_images_per_s']:.0f} | "
             f"{t['textbook_images_per_s']:.0f} | {t['ratio']:.2f} | >= 1.0 on CPU |",
             "", f"Training cost: {c['training_gflops_per_image']:.3f} GFLOPs per image (forward + backward); "
             f"achieved {c['achieved_gflops_per_s']:.1f} GFLOP/s.", "",
             "| stage (full CIFAR-10 size) | seconds | peak memory (MiB) |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {s['seconds']:.1f} | {s['peak_mib']:.0f} |" for name, s in report["stages"].items()]
    lines += ["", "| training images | seconds per epoch | peak memory (MiB) | peak memory after each epoch (MiB) |",
              "| ---: | ---: | ---: | --- |"]
    lines += [f"| {s['train_images']:,} | {s['epoch_seconds']:.1f} | {s['peak_mib']:.0f} | "
              f"{', '.join(f'{m:.0f}' for m in s['rss_by_epoch_mib'])} |" for s in report["scaling"]]
    lines += _augmentation_lines(report["augmentation"])
    text = "\n".join(lines) + "\n"
    (RESULTS / "training.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
