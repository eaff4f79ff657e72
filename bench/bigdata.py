"""Datasets larger than memory: the disk-backed cache's peak memory as the dataset grows, a dataset
several times a memory cap through every stage that reads it, and training throughput from disk
against training from memory.

    python bench/bigdata.py [--quick] [--cap-mib 2048]

1. memory:     folder datasets of 224 px JPEGs at three sizes, each through the preprocess, finetune
               (train.data_on: disk, one epoch, the model computing at 32 px) and evaluate stage
               scripts (batch 128 both): each process's peak resident memory (VmHWM) against the
               cache's size.
2. capped:     the largest dataset again through `dvc repro` (every stage, in a git + DVC project) in
               a memory cgroup capped at --cap-mib (Linux, root: cgroup v1 or v2), train.data_on:
               auto: that it finished, what auto chose, and each stage's peak resident memory
               (sampled every 50 ms: a stage under DVC is not wrapped by bench/peak.py).
3. throughput: finetune on the middle dataset, rounds alternating train.data_on host (in memory) and
               disk with the cache in the page cache; then disk with the cache's pages evicted first
               (posix_fadvise DONTNEED: the first epoch reads from the disk, or from whatever caches the
               disk below this machine). images_per_second from metrics/train.json.

Writes bench/results/bigdata.json and bench/results/bigdata.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
PEAK = REPO / "bench" / "peak.py"
SIDE = 224
CLASSES = 10


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    return f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"


def make_tree(root: Path, count: int, seed: int = 0) -> Path:
    """`count` 224 px JPEGs in CLASSES class folders: a colour per class under smooth noise (small
    files, quick to write and decode; the cache holds them decoded, 147 KiB each)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, (CLASSES, 3))
    for i in range(count):
        c = i % CLASSES
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.normal(0, 40, (14, 14, 3))
        noise = np.kron(coarse, np.ones((16, 16, 1)))  # 14 x 16 = 224
        pixels = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=85)
    return root


def project(root: Path, tree: Path, overrides: dict) -> Path:
    """A project that runs the stage scripts of this checkout on `tree`."""
    root.mkdir(parents=True)
    for name in ("stages", "src"):
        (root / name).symlink_to(REPO / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    base = {"data.dataset": "folder", "data.path": str(tree), "data.image_size": SIDE, "model.weights": "none",
            "model.image_size": 32, "train.epochs": 1, "train.batch_size": 128, "train.device": "cpu",
            "evaluate.batch_size": 128, "log.images": 8, "log.graph": False, "log.histograms": False}
    for dotted, value in {**base, **overrides}.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


class Cgroup:
    """A memory cgroup capped at `limit` bytes that the stage processes join (v2, else v1)."""

    def __init__(self, limit: int):
        here = next(line for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if line.startswith("0::") or ":memory:" in line)
        v2 = here.startswith("0::") and Path("/sys/fs/cgroup/cgroup.controllers").exists()
        base = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/memory")
        self.path = base / here.split(":", 2)[2].lstrip("/") / f"reprotune-bench-{os.getpid()}"
        self.path.mkdir()
        (self.path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
        with contextlib.suppress(OSError):  # no swap for it either, where swap accounting exists
            (self.path / ("memory.swap.max" if v2 else "memory.memsw.limit_in_bytes")).write_text(
                "0" if v2 else str(limit))
        self.events = self.path / ("memory.events" if v2 else "memory.failcnt")
        self.peak = self.path / ("memory.peak" if v2 else "memory.max_usage_in_bytes")  # page cache included

    def prefix(self) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"]

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def run_stage(root: Path, stage: str, prefix: list[str] | None = None) -> dict:
    out = root / f".peak-{stage}.json"
    started = time.perf_counter()
    done = subprocess.run([*(prefix or []), sys.executable, str(PEAK), str(out), f"stages/{stage}.py"], cwd=root,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed in {root} (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return {"seconds": time.perf_counter() - started, "peak_mib": json.loads(out.read_text())["peak_mib"],
            "stdout": done.stdout}


def dvc_project(root: Path, tree: Path, overrides: dict) -> Path:
    """A git + DVC project of this checkout's pipeline, with `tree` linked in as its data."""
    project(root, root / "data/raw/images", overrides)
    for name in ("stages", "src"):  # copies, not links: DVC hashes them as the stages' code deps
        (root / name).unlink()
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", "data/incoming/README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    for path in tree.rglob("*.jpg"):  # hard links: the same files, inside the project
        (root / "data/raw/images" / path.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(path, root / "data/raw/images" / path.parent.name / path.name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["path"] = "data/raw/images"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    with open(root / ".git/info/exclude", "a") as f:
        f.write("/data/raw/images/\n")  # a dependency DVC hashes; no need to copy it into git too
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    return root


def repro(root: Path, prefix: list[str]) -> dict:
    """`dvc repro` in `root` behind `prefix`; its time and each stage process's peak RSS, sampled."""
    peaks: dict[str, float] = {}
    # the stages' `python` is this environment's, as after `source .venv/bin/activate`
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    started = time.perf_counter()
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "dvc", "repro"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True) if psutil.pid_exists(proc.pid) else []:
            with contextlib.suppress(psutil.Error):
                stage = next((Path(a).stem for a in child.cmdline() if a.startswith("stages/")), None)
                if stage:
                    peaks[stage] = max(peaks.get(stage, 0.0), child.memory_info().rss / 2**20)
        time.sleep(0.05)
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed in {root} (exit {proc.returncode}):\n{''.join(output)[-3000:]}")
    chose = next((line.strip() for line in output if line.startswith("training from")), "in memory")
    return {"seconds": time.perf_counter() - started, "peak_mib": peaks, "chose": chose}


def cache_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "data/processed").glob("*.npy"))


def evict(root: Path) -> None:
    """Drop the cache files' pages from the page cache (clean pages; no root needed)."""
    for path in (root / "data/processed").glob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(root: Path) -> None:
    for path in (root / "data/processed").glob("*.npy"):
        with open(path, "rb") as f:
            while f.read(64 * 2**20):
                pass


def images_per_second(root: Path) -> float:
    return json.loads((root / "metrics/train.json").read_text())["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--cap-mib", type=int, default=2048, help="the memory cap of section 2 (MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds of each path")
    args = parser.parse_args()
    sizes = (600, 1200, 2400) if args.quick else (4000, 12000, 36000)
    report: dict = {"machine": machine(), "sizes": list(sizes), "side": SIDE, "cap_mib": args.cap_mib}
    with tempfile.TemporaryDirectory(prefix="reprotune-bigdata-", dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        print(f"writing {max(sizes):,} JPEGs at {SIDE} px", flush=True)
        full = make_tree(tmp / "full", max(sizes))
        trees = {}
        for size in sizes:  # smaller sets: the first images of the big one, linked
            tree = tmp / f"tree{size}"
            for c in range(CLASSES):
                (tree / f"class{c}").mkdir(parents=True)
            for i in range(size):
                os.link(full / f"class{i % CLASSES}" / f"{i}.jpg", tree / f"class{i % CLASSES}" / f"{i}.jpg")
            trees[size] = tree

        print("1. peak memory as the dataset grows (train.data_on: disk)", flush=True)
        rows = []
        for size in sizes:
            root = project(tmp / f"p{size}", trees[size], {"train.data_on": "disk"})
            row = {"images": size}
            for stage in ("preprocess", "finetune", "evaluate"):
                row[stage] = {k: v for k, v in run_stage(root, stage).items() if k != "stdout"}
            row["cache_mib"] = cache_bytes(root) / 2**20
            row["images_per_second"] = images_per_second(root)
            rows.append(row)
            print(f"  {size:,} images: cache {row['cache_mib']:,.0f} MiB; peak "
                  + ", ".join(f"{s} {row[s]['peak_mib']:.0f} MiB" for s in ("preprocess", "finetune", "evaluate")),
                  flush=True)
        report["memory"] = rows

        print(f"2. the largest set under a {args.cap_mib} MiB memory cap (train.data_on: auto)", flush=True)
        try:
            group = Cgroup(args.cap_mib * 2**20)
        except (OSError, StopIteration) as exc:
            report["capped"] = {"skipped": f"no memory cgroup here ({exc})"}
            print(f"  skipped: {report['capped']['skipped']}", flush=True)
        else:
            try:
                root = dvc_project(tmp / "capped", trees[max(sizes)], {"train.data_on": "auto"})
                capped = {"images": max(sizes), **repro(root, group.prefix())}
                capped["cache_mib"] = cache_bytes(root) / 2**20
                capped["cap_hits"] = group.events.read_text().strip()
                with contextlib.suppress(OSError, ValueError):
                    capped["cgroup_peak_mib"] = int(group.peak.read_text()) / 2**20
                report["capped"] = capped
                print(f"  dvc repro: exit 0 in {capped['seconds']:.0f} s, cache {capped['cache_mib']:,.0f} MiB under "
                      f"a {args.cap_mib} MiB cap; peaks " + ", ".join(
                          f"{s} {m:.0f} MiB" for s, m in capped["peak_mib"].items()) + f"; {capped['chose']}",
                      flush=True)
            finally:
                group.remove()

        middle = sizes[1]
        print(f"3. throughput on {middle:,} images: memory against the disk cache", flush=True)
        root = tmp / f"p{middle}"
        speeds: dict[str, list[float]] = {"host": [], "disk": []}
        for _ in range(args.rounds):
            for where in ("host", "disk"):
                params = yaml.safe_load((root / "params.yaml").read_text())
                params["train"]["data_on"] = where
                (root / "params.yaml").write_text(yaml.safe_dump(params))
                warm(root)
                run_stage(root, "finetune")
                speeds[where].append(images_per_second(root))
                print(f"  {where}: {speeds[where][-1]:.0f} img/s", flush=True)
        cold = []
        for _ in range(args.rounds):
            evict(root)
            run_stage(root, "finetune")
            cold.append(images_per_second(root))
            print(f"  disk, evicted first: {cold[-1]:.0f} img/s", flush=True)
        report["throughput"] = {"images": middle, "host": speeds["host"], "disk_cached": speeds["disk"],
                                "disk_evicted": cold,
                                "ratio_cached": statistics.median(speeds["disk"]) / statistics.median(speeds["host"]),
                                "ratio_evicted": statistics.median(cold) / statistics.median(speeds["host"])}
    write(report, args)


def write(report: dict, args) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bigdata.json").write_text(json.dumps(report, indent=2) + "\n")
    command = "python bench/bigdata.py" + (" --quick" if args.quick else "") + \
        (f" --cap-mib {args.cap_mib}" if args.cap_mib != 2048 else "")
    lines = ["# Datasets larger than memory", "",
             f"`{command}` on {report['machine']}; folder datasets of {report['side']} px JPEGs, cached at "
             f"{report['side']} px (147 KiB an image), the model computing at 32 px, one epoch, batch 128 (training "
             "and evaluation). "
             "Peak memory: each stage process's VmHWM (resident high-water mark; the page cache the cache is "
             "read through is the kernel's, not the process's).", "",
             "| images | cache (MiB) | preprocess peak (MiB) | finetune peak (MiB) | evaluate peak (MiB) | img/s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['images']:,} | {r['cache_mib']:,.0f} | {r['preprocess']['peak_mib']:.0f} | "
              f"{r['finetune']['peak_mib']:.0f} | {r['evaluate']['peak_mib']:.0f} | {r['images_per_second']:.0f} |"
              for r in report["memory"]]
    capped = report["capped"]
    lines += ["", f"Under a {report['cap_mib']} MiB memory cgroup (train.data_on: auto):"]
    if "skipped" in capped:
        lines += ["", f"skipped: {capped['skipped']}"]
    else:
        lines += ["", f"`dvc repro` of {capped['images']:,} images, a {capped['cache_mib']:,.0f} MiB cache "
                  f"({capped['cache_mib'] / report['cap_mib']:.1f}x the cap), every stage: exit 0 in "
                  f"{capped['seconds']:.0f} s. auto chose: \"{capped['chose']}\". Peak resident memory of each stage "
                  "(sampled every 50 ms): " + ", ".join(f"{s} {m:.0f} MiB" for s, m in capped["peak_mib"].items())
                  + f". The cgroup's own peak, page cache included: {capped.get('cgroup_peak_mib', float('nan')):,.0f} "
                  f"MiB; its count of charges that met the limit (memory.failcnt, or memory.events in v2): "
                  f"{capped['cap_hits']!r}."]
    t = report["throughput"]
    lines += ["", f"Training throughput on {t['images']:,} images, images/s per round "
              "(rounds alternate; ratio of medians against in memory):", "",
              "| train.data_on | rounds (img/s) | median | ratio |", "| --- | --- | ---: | ---: |",
              f"| host (in memory) | {', '.join(f'{v:.0f}' for v in t['host'])} | "
              f"{statistics.median(t['host']):.0f} | 1.00 |",
              f"| disk, cache in the page cache | {', '.join(f'{v:.0f}' for v in t['disk_cached'])} | "
              f"{statistics.median(t['disk_cached']):.0f} | {t['ratio_cached']:.2f} |",
              f"| disk, pages evicted first | {', '.join(f'{v:.0f}' for v in t['disk_evicted'])} | "
              f"{statistics.median(t['disk_evicted']):.0f} | {t['ratio_evicted']:.2f} |"]
    (RESULTS / "bigdata.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
