"""The download stage's work: fetch the archive (md5-checked) or synthesize it, and log what arrived.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tensorboardX import SummaryWriter

from reprotune.config import DOWNLOADED, DataConfig
from reprotune.data.fetch import fetch_archive
from reprotune.data.synthetic import write_synthetic_archive
from reprotune.tracking import tensorboard


def download(cfg: DataConfig, writer: SummaryWriter) -> dict:
    """The download stage: fetch the archive (md5-checked) or synthesize it into DOWNLOADED, then
    log what arrived. A local image tree (dataset folder with `path`) needs nothing fetched: the
    directory is left empty and preprocess reads the tree, a DVC dependency of its own."""
    started = time.perf_counter()
    out = Path(DOWNLOADED)
    archive = cfg.archive
    if cfg.dataset == "synthetic":
        info = write_synthetic_archive(archive, cfg.synthetic_train, cfg.synthetic_test, cfg.synthetic_seed)
    elif archive is not None:
        info = fetch_archive(*cfg.source, archive)
    else:
        out.mkdir(parents=True, exist_ok=True)
        info = {"url": None, "path": cfg.path, "md5": None, "bytes": 0, "seconds": time.perf_counter() - started}
    for stale in out.iterdir():  # another dataset's archive, from a run outside DVC
        if archive is None or stale.name != archive.name:
            stale.unlink() if stale.is_file() or stale.is_symlink() else shutil.rmtree(stale)
    info["dataset"] = cfg.dataset
    tensorboard.log_table(writer, "download/archive", ["dataset", "source", "md5", "bytes", "seconds"],
                 [[cfg.dataset, info["url"] or cfg.path, info["md5"] or "-", info["bytes"], f"{info['seconds']:.2f}"]])
    writer.add_scalar("download/megabytes", info["bytes"] / 2**20, 0)
    writer.add_scalar("download/seconds", info["seconds"], 0)
    return info

