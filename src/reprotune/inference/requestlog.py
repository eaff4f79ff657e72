"""What the server was asked: a bounded, rotating folder of request images for `reprotune monitor`.

Each image a replica classifies is written as a PNG of exactly what the model saw (decoded, resized,
RGB), with a JSON file of the same name beside it: the predicted class, its probability, the top
classes and the time. Names start with the UTC time, so sorting them sorts by arrival across replicas
and machines sharing the folder. The folder is the layout `reprotune monitor` reads (image files
directly in it; it leaves the JSON files alone), and once someone has sorted a sample into class
folders, the layout preprocess reads too.

Rotation keeps the newest files: every `ROTATE_EVERY` images a replica lists the folder and deletes
the oldest PNG/JSON pairs until at most `max_images` images and `max_mb` MiB of PNG remain. Between two
rotations the folder can exceed the bounds by ROTATE_EVERY images per replica.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from reprotune.inference.runtime import softmax

ROTATE_EVERY = 100
TOP = 3  # classes listed per image in its JSON


class RequestLog:
    """One replica's writer into the shared folder."""

    def __init__(self, folder: Path, classes: list[str], max_images: int, max_mb: float):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.classes = classes
        self.max_images, self.max_bytes = max_images, int(max_mb * 2**20)
        self.tag = f"{os.getpid()}-{os.urandom(3).hex()}"  # unique per replica, even across machines
        self.count = 0
        self.lock = threading.Lock()  # requests run in threads: one counter, one rotation at a time
        self.rotate()

    def record(self, images: np.ndarray, logits: np.ndarray) -> None:
        """Write float32 (N, 3, S, S) images in [0, 1] and their predictions."""
        probs = softmax(logits)
        now = datetime.datetime.now(datetime.UTC)
        stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
        for image, p in zip(images, probs, strict=True):
            with self.lock:
                self.count += 1
                name = f"{stamp}-{self.tag}-{self.count:08d}"
                rotate = self.count % ROTATE_EVERY == 0
            top = np.argsort(-p)[:TOP]
            meta = {"prediction": self.classes[top[0]], "probability": float(p[top[0]]),
                    "top": [{"label": self.classes[i], "probability": float(p[i])} for i in top],
                    "time": now.isoformat()}
            png = io.BytesIO()
            Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)).save(png, "PNG")
            # The JSON first, then the PNG, each under a hidden name renamed into place: a reader never
            # sees a torn file, and every image it sees has its prediction beside it. Not io.atomic_file:
            # its sweep for a killed write's leftovers globs the folder, thousands of files, per request.
            for suffix, payload in ((".json", json.dumps(meta).encode()), (".png", png.getvalue())):
                tmp = self.folder / f".{name}{suffix}.tmp"
                tmp.write_bytes(payload)
                os.replace(tmp, self.folder / f"{name}{suffix}")
            if rotate:
                self.rotate()

    def rotate(self) -> None:
        """Delete the oldest images (and their JSON) beyond the bounds."""
        with self.lock:
            entries = []
            for entry in os.scandir(self.folder):
                if entry.name.endswith(".png") and not entry.name.startswith("."):
                    try:
                        entries.append((entry.name, entry.stat().st_size))
                    except FileNotFoundError:  # another replica rotated it away
                        continue
            entries.sort()
            total = sum(size for _, size in entries)
            for index, (name, size) in enumerate(entries):
                if len(entries) - index <= self.max_images and total <= self.max_bytes:
                    break
                (self.folder / name).unlink(missing_ok=True)
                (self.folder / name).with_suffix(".json").unlink(missing_ok=True)
                total -= size
