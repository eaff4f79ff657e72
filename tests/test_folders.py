"""Folder datasets (a tree, or an archive of one) and CIFAR-100: layout, decoding, bad input, the pipeline."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fixtures import make_project, run
from reprotune.config import DataConfig, Params
from reprotune.data import folders
from reprotune.data.cifar import cifar100, read_archive
from reprotune.data.splits import load_split
from reprotune.errors import ReprotuneError
from reprotune.images import load_image

COLOURS = {"cat": (200, 60, 40), "dog": (40, 160, 60), "owl": (50, 70, 200)}


def picture(colour, size=(40, 30), seed=0, mode="RGB") -> Image.Image:
    """A noisy image of one colour, so classes are told apart and no two files are equal."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8)).convert(mode)


def make_tree(root: Path, counts: dict[str, int], split: str = "") -> Path:
    """`counts[c]` images per class under root/split/c, in several formats, sizes and modes."""
    for c, n in counts.items():
        folder = root / split / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            size = [(40, 30), (30, 48), (64, 64)][i % 3]
            image = picture(COLOURS[c], size, seed=hash((c, i, split)) % 1000)
            kind = i % 4
            if kind == 0:
                image.save(folder / f"{i}.png")
            elif kind == 1:  # some with an EXIF orientation (6: stored rotated, shown upright)
                exif = Image.Exif()
                exif[0x0112] = 6 if i % 8 == 1 else 1
                image.save(folder / f"{i}.jpg", quality=90, exif=exif)
            elif kind == 2:
                image.convert("L").save(folder / f"{i}.png")  # grayscale
            else:
                image.convert("P").save(folder / f"{i}.gif")  # palette
    return root


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"dataset": "folder", "image_size": 16, **kw})


def test_a_tree_reads_with_sorted_classes_its_test_share_held_out_and_the_predict_decoder(tmp_path):
    root = make_tree(tmp_path / "pets", {"owl": 10, "cat": 10, "dog": 10})
    raw = folders.read(cfg(path=str(root), test_fraction=0.2), workers=2)
    assert raw.classes == ["cat", "dog", "owl"]
    assert raw.test_images.shape == (6, 3, 16, 16) and raw.train_images.shape == (24, 3, 16, 16)
    assert np.bincount(raw.test_labels).tolist() == [2, 2, 2]  # stratified
    assert raw.skipped == []
    # Every cached image is what `reprotune predict`'s decoder gives for its file.
    files = sorted((root / "cat").iterdir(), key=lambda p: p.name)
    decoded = {f.name: load_image(f, 16) for f in files}
    cats = [*raw.train_images[raw.train_labels == 0], *raw.test_images[raw.test_labels == 0]]
    assert all(any(np.array_equal(x, d) for d in decoded.values()) for x in cats) and len(cats) == 10
    # The hold-out has a fixed seed: the same files whatever `seed` the run uses.
    again = folders.read(cfg(path=str(root), test_fraction=0.2), workers=1)
    assert np.array_equal(again.test_images, raw.test_images)


def test_train_and_test_roots_and_an_archive_wrapper(tmp_path):
    tree = tmp_path / "tree"
    make_tree(tree / "wrap", {"cat": 4, "dog": 4}, "train")
    make_tree(tree / "wrap", {"cat": 2, "dog": 3}, "val")
    (tree / "wrap" / "notes.csv").write_text("not, an, image\n")  # beside the roots: left alone
    raw = folders.read(cfg(path=str(tree), val_fraction=0.25))
    assert (len(raw.train_labels), len(raw.test_labels)) == (8, 5) and raw.skipped == []
    archive = tmp_path / "pets.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "wrap", arcname="wrap")
    from_archive = folders.read_source(folders.Archive(archive), cfg(path=str(tree), val_fraction=0.25))
    assert np.array_equal(from_archive.train_images, raw.train_images)
    assert np.array_equal(from_archive.test_labels, raw.test_labels)


@pytest.mark.reliability
def test_bad_files_are_skipped_and_named_or_fail_with_one_line(tmp_path):
    root = make_tree(tmp_path / "pets", {"cat": 6, "dog": 6})
    (root / "cat" / "notes.txt").write_text("hello")
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
    outside = tmp_path / "elsewhere.png"
    picture(COLOURS["cat"]).save(outside)
    (root / "cat" / "link.png").symlink_to(outside)  # out of the tree: not followed
    (root / "cat" / ".DS_Store").write_bytes(b"\0")  # hidden: not a file of the dataset
    raw = folders.read(cfg(path=str(root), test_fraction=0.34))
    assert len(raw.skipped) == 3 and len(raw.train_labels) + len(raw.test_labels) == 12
    assert any("notes.txt: not a readable image" in s for s in raw.skipped)
    assert any(s.startswith(f"{root / 'dog' / 'cut.png'}: ") for s in raw.skipped)
    assert any("link.png: a link out of the tree, not followed" in s for s in raw.skipped)
    with pytest.raises(ReprotuneError, match=r"notes\.txt: not a readable image \(data\.on_bad_image: fail"):
        folders.read(cfg(path=str(root), on_bad_image="fail"))


@pytest.mark.reliability
@pytest.mark.parametrize("build, message", [
    (lambda r: make_tree(r, {"cat": 3}), r"pets: a single class folder \(cat\)"),
    (lambda r: r.mkdir(), r"pets: no class folders"),
    (lambda r: (make_tree(r, {"cat": 3, "dog": 3}), (r / "owl").mkdir()), r"pets/owl: a class folder with no files"),
    (lambda r: (make_tree(r, {"cat": 3, "dog": 3}, "train"), make_tree(r, {"cat": 2, "owl": 2}, "test")),
     r"pets/test: its class folders differ from train/'s: missing dog; not in train/: owl"),
    (lambda r: make_tree(r, {"cat": 6, "dog": 1}), r"pets/dog: 1 readable image\(s\), too few for data.test_fraction"),
])
def test_a_tree_that_cannot_make_a_dataset_is_refused_naming_the_folder(tmp_path, build, message):
    root = tmp_path / "pets"
    build(root)
    with pytest.raises(ReprotuneError, match=message):
        folders.read(cfg(path=str(root)))


@pytest.mark.reliability
def test_a_dataset_too_large_for_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "pets", {"cat": 5, "dog": 5})
    monkeypatch.setattr(folders, "available_memory", lambda: 10 * 3 * 64 * 64)  # a third of what 64 px needs
    monkeypatch.setattr(folders, "load_image", lambda *a: pytest.fail("decoded before the memory check"))
    with pytest.raises(ReprotuneError, match=r"10 images at data.image_size=64 need about .* "
                                             r"data.image_size=36 or less would fit"):
        folders.read(cfg(path=str(root), image_size=64))
    # Decoded to disk (the preprocess stage), it is the disk's room that counts: twice the images.
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda path: __import__("collections").namedtuple(
        "usage", "total used free")(0, 0, 2 * 10 * 3 * 64 * 64 - 1))
    with pytest.raises(ReprotuneError, match=r"10 images at data.image_size=64 need about .* of disk in "):
        folders.read(cfg(path=str(root), image_size=64), scratch=tmp_path / "decoded.npy")
    assert not (tmp_path / "decoded.npy").exists()


@pytest.mark.reliability
def test_archive_members_that_escape_are_refused_and_links_skipped(tmp_path):
    tree = make_tree(tmp_path / "tree", {"cat": 3, "dog": 3})
    escape = tmp_path / "escape.tar.gz"
    with tarfile.open(escape, "w:gz") as tar:
        tar.add(tree, arcname="pets")
        info = tarfile.TarInfo("pets/cat/../../../evil.png")
        payload = (tree / "cat" / "0.png").read_bytes()
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ReprotuneError, match=r"escape.tar.gz: member .*evil.png' would land outside"):
        folders.Archive(escape)
    linked = tmp_path / "linked.zip"
    with zipfile.ZipFile(linked, "w") as z:
        for f in sorted(tree.rglob("*.*")):
            z.write(f, f"pets/{f.relative_to(tree)}")
        link = zipfile.ZipInfo("pets/cat/passwd.png")
        link.external_attr = (0o120777 << 16)
        z.writestr(link, "/etc/passwd")
    source = folders.Archive(linked)
    assert source.skipped == [f"{linked}:pets/cat/passwd.png: a link or special file, not followed"]
    raw = folders.read_source(source, cfg(path=str(tree), test_fraction=0.34))
    assert len(raw.train_labels) + len(raw.test_labels) == 6


def cifar100_archive(path: Path, n_train=40, n_test=20) -> Path:
    """A CIFAR-100 python archive in the official layout (train, test, meta with both label sets)."""
    rng = np.random.default_rng(0)

    def batch(n):
        fine = rng.integers(0, 100, n)
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": fine.tolist(),
                "coarse_labels": (fine // 5).tolist(), "filenames": [f"{i}.png" for i in range(n)]}

    members = {"train": batch(n_train), "test": batch(n_test),
               "meta": {"fine_label_names": [f"fine{i}" for i in range(100)],
                        "coarse_label_names": [f"coarse{i}" for i in range(20)]}}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_cifar100_reads_fine_labels_by_default_and_coarse_when_asked(tmp_path):
    archive = cifar100_archive(tmp_path / "cifar-100-python.tar.gz")
    fine = read_archive(archive, cifar100())
    coarse = read_archive(archive, cifar100("coarse"))
    assert len(fine.classes) == 100 and fine.classes[7] == "fine7" and len(coarse.classes) == 20
    assert np.array_equal(coarse.train_labels, fine.train_labels // 5)
    assert fine.train_images.shape == (40, 3, 32, 32) and fine.test_images.shape == (20, 3, 32, 32)
    with pytest.raises(ReprotuneError, match=r"cifar-10-batches-py/batches.meta is missing"):
        read_archive(archive)  # a CIFAR-100 archive is not CIFAR-10's layout
    assert DataConfig(dataset="cifar100").source == ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                                                     "eb9058c3a382ffc7106e4002c42a8d85")


@pytest.mark.parametrize("values, message", [
    ({"dataset": "folder"}, r"data.dataset=folder needs data.path"),
    ({"dataset": "folder", "url": "x.tgz"}, r"data.md5 is required with data.url"),
    ({"dataset": "folder", "url": "x.tgz", "md5": "0" * 32, "path": "mine"}, r"both name the images"),
    ({"dataset": "cifar10", "path": "mine"}, r"data.path is for dataset folder"),
    ({"dataset": "cifar10", "image_size": 64}, r"data.image_size=64: cifar10 images are 32 px"),
])
def test_data_settings_that_contradict_each_other_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        Params.model_validate({"data": values})


@pytest.mark.dvc
def test_a_folder_dataset_through_the_pipeline(tmp_path):
    """dvc add'ed tree -> all five stages, training read from the disk cache (train.data_on: disk, as
    a dataset larger than memory is); predict on test files agrees with evaluation; editing one image
    reruns preprocess and what follows, not download."""
    project = make_project(tmp_path / "project", {
        "data.dataset": "folder", "data.path": "data/raw/pets", "data.image_size": 24, "data.test_fraction": 0.25,
        "train.epochs": 1, "train.batch_size": 8, "train.data_on": "disk", "export.calibration_images": 16,
        "export.check_images": 8, "export.int8": "optional", "log.images": 4})
    root = make_tree(project / "data/raw/pets", {"cat": 12, "dog": 12, "owl": 12}, "train")
    make_tree(root, {"cat": 4, "dog": 4, "owl": 4}, "test")
    (root / "train" / "owl" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    run(["dvc", "add", "data/raw/pets"], project)
    proc = run(["dvc", "repro"], project)
    assert "skipped 1 unreadable file(s)" in proc.stderr and "broken.jpg" in proc.stderr
    assert "training from the disk cache data/processed/" in proc.stdout
    assert sorted(p.name for p in (project / "data/processed").iterdir()) == sorted(
        f"{name}{suffix}" for name in ("train", "val", "test") for suffix in (".pt", ".images.npy"))  # no scratch
    prep = json.loads((project / "metrics/preprocess.json").read_text())
    assert (prep["skipped_images"], prep["classes"], prep["test_images"], prep["image_size"]) == (1, 3, 12, 24)
    card = json.loads((project / "models/model_card.json").read_text())
    assert card["classes"] == ["cat", "dog", "owl"] and card["input"]["shape"] == ["batch", 3, 24, 24]
    assert list((project / "data/raw/download").iterdir()) == []
    # `reprotune predict` on the test files (in the split's order: class, then name) = evaluation's calls.
    files = [f for c in ("cat", "dog", "owl") for f in sorted((root / "test" / c).iterdir())]
    out = run([str(Path(__import__("sys").executable).parent / "reprotune"), "predict", "--model",
               "models/model.onnx", *map(str, files)], project).stdout
    predicted = [json.loads(line)["top_k"][0]["label"] for line in out.splitlines()]
    assert predicted == pd.read_csv(project / "metrics/confusion.csv")["predicted"].tolist()
    test = load_split(project / "data/processed/test.pt")
    assert np.array_equal(test.images[0].numpy(), load_image(files[0], 24))
    # One image edited: preprocess (and what follows) reruns, download does not.
    picture(COLOURS["cat"], seed=99).save(root / "train" / "cat" / "0.png")
    run(["dvc", "add", "data/raw/pets"], project)
    status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    assert "preprocess" in status and "download" not in status


def test_imagenette_is_a_folder_archive_with_readable_class_names(tmp_path):
    cfg_ = DataConfig(dataset="imagenette", image_size=16)
    assert cfg_.folder and cfg_.archive == Path("data/raw/download/imagenette2-160.tgz")
    assert cfg_.source == ("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
                           "e793b78cc4c9e9a4ccc0c1155377a412")
    tree = tmp_path / "imagenette2-160"
    make_tree(tree, {"cat": 3, "dog": 3}, "train")
    make_tree(tree, {"cat": 2, "dog": 2}, "val")
    for split in ("train", "val"):  # WordNet ids, as the real archive names its folders
        (tree / split / "cat").rename(tree / split / "n03888257")
        (tree / split / "dog").rename(tree / split / "n01440764")
    raw = folders.read_source(folders.Tree(tmp_path), DataConfig(dataset="imagenette", image_size=16,
                                                                 val_fraction=0.34))
    assert raw.classes == ["tench", "parachute"]  # in the order of their ids


@pytest.mark.dvc
@pytest.mark.parametrize("kind", ["cifar100", "folder archive"])
def test_cifar100_and_a_folder_archive_download_and_preprocess_through_dvc(tmp_path, kind):
    """Fetched from a local copy by the download stage (md5-checked), read by preprocess."""
    if kind == "cifar100":
        archive = cifar100_archive(tmp_path / "cifar-100-python.tar.gz", n_train=300, n_test=50)
        overrides = {"data.dataset": "cifar100", "data.cifar100_labels": "coarse"}
    else:
        tree = make_tree(tmp_path / "tree" / "pets", {"cat": 6, "dog": 6, "owl": 6})
        archive = tmp_path / "pets.zip"
        with zipfile.ZipFile(archive, "w") as z:
            for f in sorted(tree.rglob("*.*")):
                z.write(f, f"pets/{f.relative_to(tree)}")
        overrides = {"data.dataset": "folder", "data.image_size": 20, "data.test_fraction": 0.34}
    md5 = __import__("hashlib").md5(archive.read_bytes()).hexdigest()
    project = make_project(tmp_path / "project", {**overrides, "data.url": str(archive), "data.md5": md5})
    run(["dvc", "repro", "preprocess"], project)
    assert [p.name for p in (project / "data/raw/download").iterdir()] == [archive.name]
    train = load_split(project / "data/processed/train.pt")
    prep = json.loads((project / "metrics/preprocess.json").read_text())
    if kind == "cifar100":
        assert len(train.classes) == 20 and prep["test_images"] == 50 and train.images.shape[1:] == (3, 32, 32)
    else:
        assert train.classes == ["cat", "dog", "owl"] and train.images.shape[1:] == (3, 20, 20)
        assert prep["test_images"] == 6 and prep["skipped_images"] == 0
