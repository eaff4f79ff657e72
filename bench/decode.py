"""Folder-dataset decoding: reprotune's reader against a plain Pillow loop, on the same files.

    python bench/decode.py [--images 300] [--size 64]

Writes JPEG trees (camera-sized 1024x768 photos, and Imagenette-160-sized 213x160 ones) plus a
PNG tree to a temporary folder, then times, per tree:
- plain: `Image.open(f).convert("RGB").resize((size, size))` in one loop, the textbook way;
- reprotune, 1 thread: `folders.Tree(...).decoded(...)` on one thread (JPEG draft mode, EXIF, the
  aspect-preserving resize and crop `reprotune predict` uses);
- reprotune, all cores: the same on a thread per core (what `dvc repro` runs).
Prints a Markdown table (also bench/results/decode.md): images per second and speed-up over plain.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from reprotune.data import folders

RESULTS = Path(__file__).parent / "results"


def write_tree(root: Path, count: int, size: tuple[int, int], fmt: str) -> list[folders.File]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        # Smooth content with some noise: compresses like a photo, not like random bytes.
        image = Image.fromarray(np.roll(base, i, axis=1)).resize(size, Image.Resampling.BICUBIC)
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        image.save(folder / f"{i}.{fmt}", quality=90) if fmt == "jpg" else image.save(folder / f"{i}.{fmt}")
    return folders.Tree(root).files


def plain(root: Path, files: list[folders.File], size: int) -> None:
    for f in files:
        with Image.open(root.joinpath(*f.parts)) as image:
            np.asarray(image.convert("RGB").resize((size, size)))


def ours(root: Path, files: list[folders.File], size: int, workers: int) -> None:
    for _, result in folders.Tree(root).decoded(files, size, workers):
        assert not isinstance(result, str), result


def timed(fn, *args, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=64, help="data.image_size")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, size, fmt in [("JPEG 1024x768", (1024, 768), "jpg"),
                                 ("JPEG 213x160 (Imagenette-160)", (213, 160), "jpg"),
                                 ("PNG 320x240", (320, 240), "png")]:
            root = Path(tmp) / label.split()[0] / str(size[0])
            files = write_tree(root, args.images, size, fmt)
            base = timed(plain, root, files, args.size)
            one = timed(ours, root, files, args.size, 1)
            every = timed(ours, root, files, args.size, cores)
            rows.append((label, len(files) / base, len(files) / one, len(files) / every, base / one, base / every))
    lines = [f"{args.images} images per tree, data.image_size {args.size}, {cores} cores "
             f"(best of 3; `python bench/decode.py --images {args.images} --size {args.size}`)", "",
             "| files | plain Pillow loop, img/s | reprotune 1 thread, img/s | reprotune all cores, img/s "
             "| speed-up, 1 thread | speed-up, all cores |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r[0]} | {r[1]:,.0f} | {r[2]:,.0f} | {r[3]:,.0f} | {r[4]:.1f}x | {r[5]:.1f}x |" for r in rows]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
