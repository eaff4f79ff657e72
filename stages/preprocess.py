"""DVC stage `preprocess`: read and validate the images, cache train/val/test as uint8 arrays on disk."""

import sys
import time
from pathlib import Path

from reprotune.config import load_params
from reprotune.data import folders
from reprotune.data.preprocess import preprocess, read_cifar
from reprotune.data.splits import save_split
from reprotune.entrypoint import ParamsFile, run_stage
from reprotune.files import atomic_dir, write_json
from reprotune.tracking import tensorboard

PROCESSED = Path("data/processed")
SHOWN = 5  # unreadable files listed on stderr; skipped_images in metrics/preprocess.json counts them all


def main(params: ParamsFile = Path("params.yaml")) -> None:
    cfg = load_params(params)
    folders.one_heap()  # before the decoder threads: flat memory however many images
    started = time.perf_counter()
    with atomic_dir(PROCESSED) as tmp:
        # A folder dataset is decoded to a scratch file beside the splits, never into memory whole;
        # the splits are then copied out of it a chunk at a time.
        scratch = tmp / "decoded.npy"
        raw = folders.read(cfg.data, scratch=scratch) if cfg.data.folder else read_cifar(cfg.data)
        with tensorboard.stage_writer("runs/preprocess") as writer:
            splits, metrics = preprocess(raw, cfg.data, cfg.seed, cfg.log.images, writer)
        for name, split in splits.items():
            save_split(split, tmp / f"{name}.pt")
        scratch.unlink(missing_ok=True)
    metrics["seconds"] = time.perf_counter() - started  # reading, decoding and writing included
    write_json("metrics/preprocess.json", metrics)
    if raw.skipped:
        shown = "\n".join(f"  {line}" for line in raw.skipped[:SHOWN])
        more = f"\n  ... and {len(raw.skipped) - SHOWN} more" if len(raw.skipped) > SHOWN else ""
        print(f"skipped {len(raw.skipped)} unreadable file(s) (data.on_bad_image: skip):\n{shown}{more}",
              file=sys.stderr)
    print(", ".join(f"{name} {len(s.labels):,}" for name, s in splits.items()) + f" images -> {PROCESSED}/")

if __name__ == "__main__":
    run_stage(main)
