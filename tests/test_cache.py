"""The disk-backed cache (issue "Datasets larger than memory"): its files read like the arrays they
hold, old or damaged caches are refused in one line, training reads it by index exactly as it would
index memory, and nothing reads it whole: training, evaluation, export and the drift reference, nor
preprocess while it writes it."""

from __future__ import annotations

import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboardX import SummaryWriter

from fixtures import synthetic_splits
from reprotune.config import DataConfig, EvaluateConfig, ExportConfig, Params
from reprotune.data import cache, folders
from reprotune.data.cache import CachedImages
from reprotune.data.splits import Split, load_split, make_splits, save_split
from reprotune.errors import ReprotuneError
from reprotune.evaluation.reference import build_reference
from reprotune.evaluation.report import evaluate_model
from reprotune.export.release import Reference, batched
from reprotune.training import feed
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.loop import finetune
from reprotune.training.model import build_model


@pytest.fixture(scope="module")
def splits():
    return synthetic_splits(400, 60, 0.2)


@pytest.fixture(scope="module")
def cached(splits, tmp_path_factory) -> dict[str, Split]:
    """The same splits written as the preprocess stage writes them, and loaded back (images on disk)."""
    root = tmp_path_factory.mktemp("processed")
    for name, split in splits.items():
        save_split(split, root / f"{name}.pt")
    return {name: load_split(root / f"{name}.pt") for name in splits}


class Reads:
    """Every read of the cache, by rows; `load` (the whole file into memory) refused."""

    def __init__(self, monkeypatch):
        self.rows: list[int] = []
        real_gather, real_read = CachedImages.gather, CachedImages.read

        def gather(images, idx, out=None):
            batch = real_gather(images, idx, out)
            self.rows.append(len(batch))
            return batch

        def read(images, start, stop, out=None):
            self.rows.append(stop - start)
            return real_read(images, start, stop, out)

        def load(images, pin=False):
            raise AssertionError(f"{images.path} loaded whole")

        monkeypatch.setattr(CachedImages, "gather", gather)
        monkeypatch.setattr(CachedImages, "read", read)
        monkeypatch.setattr(CachedImages, "load", load)


def test_the_cache_reads_like_the_array_it_holds(splits, cached, tmp_path):
    images = splits["train"].images
    disk = cached["train"].images
    assert disk.shape == images.shape and len(disk) == len(images) and disk.nbytes == images.nbytes
    assert torch.equal(disk[3:17], images[3:17]) and torch.equal(disk[5], images[5])
    assert torch.equal(disk[-1], images[-1])
    idx = torch.tensor([9, 2, 3, 4, 300, 0, 1])  # runs and jumps, in the order asked for
    assert torch.equal(disk[idx], images[idx]) and torch.equal(disk[np.array([7])], images[[7]])
    picked = disk.select(np.array([50, 10, 11, 12]))  # a selection of a selection
    assert torch.equal(picked[1:3], images[[10, 11]]) and torch.equal(picked.select([3, 0])[:], images[[12, 50]])
    assert torch.equal(disk.load(), images) and torch.equal(picked.load(), images[[50, 10, 11, 12]])
    assert torch.equal(disk.flip(3)[2:4], images[2:4].flip(3))
    with pytest.raises(IndexError):
        disk[torch.tensor([len(images)])]
    # A plain .npy: numpy maps it, for anyone who wants to look inside.
    mapped = np.load(disk.path, mmap_mode="r")
    assert np.array_equal(mapped[:10], images[:10].numpy())
    assert torch.equal(cached["train"].labels, splits["train"].labels) and cached["train"].mean == splits["train"].mean


def test_an_old_truncated_or_missing_cache_is_refused_in_one_line(splits, tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"images": splits["val"].images, "labels": splits["val"].labels, "classes": ["a"], "mean": [0.5] * 3,
                "std": [0.2] * 3}, old)
    for path, says in [(old, "from an older reprotune"), (tmp_path / "none.pt", "not found")]:
        with pytest.raises(ReprotuneError, match=says) as error:
            load_split(path)
        assert "\n" not in str(error.value)
        assert "rerun the preprocess stage" in str(error.value) or says == "not found"
    save_split(splits["val"], tmp_path / "val.pt")
    images = cache.images_path(tmp_path / "val.pt")
    images.write_bytes(images.read_bytes()[:-100])  # an interrupted copy
    with pytest.raises(ReprotuneError, match=r"val.images.npy: .* bytes, its header says .*rerun the preprocess"):
        load_split(tmp_path / "val.pt")
    images.unlink()
    with pytest.raises(ReprotuneError, match="processed images not found"):
        load_split(tmp_path / "val.pt")


def _params(data_on: str) -> Params:
    return Params.model_validate({"model": {"weights": "none"},
                                  "log": {"graph": False, "images": 4, "histograms": False},
                                  "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "device": "cpu",
                                            "deterministic": True, "data_on": data_on}})


def test_training_from_memory_and_from_the_disk_cache_is_bitwise_the_same(splits, cached, tmp_path, monkeypatch,
                                                                          capsys):
    """Same seed, same weights, same history, whether the images sit in memory as a tensor (device;
    on a CPU also what auto picks when they fit), are gathered from host memory, or are read from
    the disk cache a batch at a time by the prefetching thread, which never loads the file whole."""
    runs = {}
    for where in ("device", "host"):
        runs[where] = finetune(_params(where), cached["train"], cached["val"], Checkpoints(tmp_path / where, where))
    reads = Reads(monkeypatch)
    runs["disk"] = finetune(_params("disk"), cached["train"], cached["val"], Checkpoints(tmp_path / "disk", "disk"))
    steps = len(splits["train"].labels) // 32
    assert reads.rows.count(32) >= 2 * steps and max(reads.rows) <= 32, reads.rows  # batches, never the file
    assert "training from the disk cache" in capsys.readouterr().out
    timing = ("seconds", "images_per_second", "achieved_tflops", "peak_rss_mb")
    for where in ("host", "disk"):
        for key, value in runs["device"].model.state_dict().items():
            assert torch.equal(value, runs[where].model.state_dict()[key]), (where, key)
        assert [{k: v for k, v in row.items() if k not in timing} for row in runs[where].history] == \
               [{k: v for k, v in row.items() if k not in timing} for row in runs["device"].history]


def test_auto_reads_from_disk_what_memory_cannot_hold(cached, monkeypatch):
    cfg = _params("auto").train
    cpu = torch.device("cpu")
    train, val = cached["train"], cached["val"]
    assert isinstance(feed.place(train, val, cfg, cpu, announce=False)[0], torch.Tensor)
    monkeypatch.setattr(feed, "available_memory", lambda: 2 * (train.images.nbytes + val.images.nbytes) - 1)
    images, val_images = feed.place(train, val, cfg, cpu, announce=False)
    assert isinstance(images, feed.DiskImages) and isinstance(val_images, CachedImages)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine: each would hold a copy
    monkeypatch.setattr(feed, "available_memory", lambda: 3 * (train.images.nbytes + val.images.nbytes))
    assert isinstance(feed.place(train, val, cfg, cpu, announce=False)[0], feed.DiskImages)


def test_each_rank_reads_only_its_own_share_of_each_batch(cached, monkeypatch):
    images = feed.DiskImages(cached["train"].images, torch.device("cpu"), ahead=2)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    rank1 = lambda batch: batch[len(batch) // 2:]  # noqa: E731 - rank 1 of 2
    reads = Reads(monkeypatch)
    with feed.epoch_batches(images, order, range(3), 16, rank1) as stream:
        got = [(idx, pixels.clone()) for idx, pixels in stream]
    assert [idx.tolist() for idx, _ in got] == [order[s * 16 + 8:(s + 1) * 16].tolist() for s in range(3)]
    assert reads.rows == [8, 8, 8]
    for idx, pixels in got:
        assert torch.equal(pixels, cached["train"].images.gather(idx))


def test_the_reader_thread_stops_with_the_epoch_and_passes_on_its_errors(cached, monkeypatch):
    images = feed.DiskImages(cached["train"].images, torch.device("cpu"), ahead=2)
    order = torch.arange(len(images))
    before = threading.active_count()
    with feed.epoch_batches(images, order, range(10), 8, lambda b: b) as stream:
        next(iter(stream))  # a pause after one step: the reader is mid-epoch
    assert threading.active_count() == before
    monkeypatch.setattr(CachedImages, "gather", lambda *_, **__: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        with feed.epoch_batches(images, order, range(10), 8, lambda b: b) as stream:
            list(stream)
    assert threading.active_count() == before


def test_evaluation_export_and_the_drift_reference_read_the_cache_a_batch_at_a_time(splits, cached, tmp_path,
                                                                                   monkeypatch):
    torch.manual_seed(0)
    model = build_model(_params("auto").model, len(splits["train"].classes), splits["train"].mean,
                        splits["train"].std).eval()
    with SummaryWriter(str(tmp_path / "memory")) as writer:
        in_memory = evaluate_model(model, splits["test"], EvaluateConfig(batch_size=16, tta=True), writer)
    memory_ref = Reference.of(model, splits["test"], ExportConfig(check_images=8))
    reads = Reads(monkeypatch)
    with SummaryWriter(str(tmp_path / "disk")) as writer:
        on_disk = evaluate_model(model, cached["test"], EvaluateConfig(batch_size=16, tta=True), writer)
    assert on_disk.metrics == in_memory.metrics
    disk_ref = Reference.of(model, cached["test"], ExportConfig(check_images=8))
    run = lambda x: model(torch.from_numpy(x)).detach().numpy()  # noqa: E731
    with torch.no_grad():
        assert np.array_equal(batched(run, disk_ref.test_images), batched(run, memory_ref.test_images))
    reference = build_reference(model, cached["val"], on_disk.metrics, "md5")
    assert reference["images"] == len(splits["val"].labels)
    assert max(reads.rows) <= 256 and len(reads.rows) > 3, reads.rows  # batches (reference: 256 a time)


def _tree(root: Path, count: int, side: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(count // 2):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_preprocess_never_holds_the_decoded_images_whole(tmp_path, monkeypatch):
    """Decoding into the scratch file and copying the splits out of it holds a bounded number of
    images, whatever the dataset's size: traced at its peak (numpy's allocations are traced) it stays
    under a quarter of the decoded images; the in-memory path, the same measure, holds them all."""
    count, side = 240, 48
    decoded = count * 3 * side * side
    tree = _tree(tmp_path / "tree", count, side)
    cfg = DataConfig(dataset="folder", path=str(tree), image_size=side)
    monkeypatch.setattr(cache, "CHUNK_BYTES", decoded // 20)  # small beside this set, as 32 MB beside a big one

    def peak(scratch: Path | None) -> tuple[int, dict[str, Split]]:
        tracemalloc.start()
        try:
            raw = folders.read(cfg, workers=2, scratch=scratch)
            splits = make_splits(raw, 0.2, seed=0)
            for name, split in splits.items():
                save_split(split, tmp_path / f"{name}-{scratch is None}.pt")
            return tracemalloc.get_traced_memory()[1], splits
        finally:
            tracemalloc.stop()

    streamed, on_disk = peak(tmp_path / "decoded.npy")
    whole, in_memory = peak(None)
    assert streamed < decoded / 4 < decoded <= whole, (streamed, decoded, whole)
    for name in in_memory:  # and the two give the same cache
        assert torch.equal(load_split(tmp_path / f"{name}-False.pt").images.load(), in_memory[name].images)
        assert on_disk[name].mean == in_memory[name].mean
        assert torch.equal(on_disk[name].labels, in_memory[name].labels)
