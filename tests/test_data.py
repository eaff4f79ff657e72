"""Fetching, generating and reading CIFAR-format archives, and on-device augmentation."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import math
import pickle
import socket
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from fixtures import REPO, run, set_params
from reprotune.data import cifar, fetch
from reprotune.data.cifar import MAX_MEMBERS, TRAIN_BATCHES, read_archive
from reprotune.data.fetch import fetch_archive
from reprotune.data.raw import RawData
from reprotune.data.splits import channel_stats, held_out, make_splits, stratified_split, to_float
from reprotune.data.synthetic import SYNTHETIC_CLASSES, write_synthetic_archive
from reprotune.errors import ReprotuneError
from reprotune.training.augment import PADDING_MODES, augment, jitter_colours, rotate


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, str]:
    """A small synthetic archive in the official layout, and its md5."""
    path = tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz"
    info = write_synthetic_archive(path, n_train=250, n_test=50, seed=3)
    return path, info["md5"]


@pytest.fixture
def http_server(archive):
    """Serve the archive's directory on a loopback port."""
    handler = functools.partial(_QuietHandler, directory=str(archive[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # shutdown() waits for serve_forever to look: every 0.05 s, not the default 0.5 s
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _stage_dir(tmp_path: Path, **data_params) -> Path:
    """A directory where stages/download.py can run with the given data params."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    set_params(tmp_path / "params.yaml", {f"data.{k}": v for k, v in data_params.items()})
    return tmp_path


def _download(cwd: Path, check: bool = True):
    return run(["python", str(REPO / "stages/download.py")], cwd, check=check)


def test_synthetic_archive_is_deterministic_and_in_the_official_layout(archive, tmp_path):
    path, md5 = archive
    again = write_synthetic_archive(tmp_path / "again.tar.gz", n_train=250, n_test=50, seed=3)
    assert again["md5"] == md5
    with tarfile.open(path) as tar:
        names = sorted(tar.getnames())
    assert names == sorted([f"cifar-10-batches-py/{n}" for n in
                            [*TRAIN_BATCHES, "test_batch", "batches.meta"]])
    raw = read_archive(path)
    assert raw.train_images.shape == (250, 3, 32, 32) and raw.test_images.shape == (50, 3, 32, 32)
    assert raw.classes == SYNTHETIC_CLASSES
    assert np.bincount(raw.train_labels).tolist() == [25] * 10


def test_download_over_http_verifies_md5(archive, http_server, tmp_path):
    path, md5 = archive
    cwd = _stage_dir(tmp_path, url=f"{http_server}/{path.name}", md5=md5)
    _download(cwd)
    fetched = cwd / "data/raw/download/cifar-10-python.tar.gz"
    assert fetched.read_bytes() == path.read_bytes()
    info = json.loads((cwd / "metrics/download.json").read_text())
    assert info["md5"] == md5 and info["bytes"] == path.stat().st_size


@pytest.mark.parametrize("style", ["path", "file-url"])
def test_download_from_a_local_copy(archive, tmp_path, style):
    path, md5 = archive
    url = str(path) if style == "path" else path.as_uri()
    cwd = _stage_dir(tmp_path, url=url, md5=md5)
    _download(cwd)
    assert hashlib.md5((cwd / "data/raw/download/cifar-10-python.tar.gz").read_bytes()).hexdigest() == md5


@pytest.mark.reliability
def test_md5_mismatch_is_refused_and_leaves_no_file(archive, http_server, tmp_path):
    path, _ = archive
    cwd = _stage_dir(tmp_path, url=f"{http_server}/{path.name}", md5="0" * 32)
    proc = _download(cwd, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("reprotune: error:")
    assert "does not match data.md5" in proc.stderr and "Traceback" not in proc.stderr
    assert not (cwd / "data").exists()  # no archive, no temporary, not even the folder made for them
    assert not (cwd / "metrics/download.json").exists()


@pytest.mark.reliability
def test_md5_mismatch_keeps_the_previous_archive(archive, tmp_path):
    path, md5 = archive
    dest = tmp_path / "cifar.tar.gz"
    fetch_archive(str(path), md5, dest)
    with pytest.raises(ReprotuneError, match="does not match"):
        fetch_archive(str(path), "f" * 32, dest)
    assert dest.read_bytes() == path.read_bytes()


@pytest.mark.reliability
def test_unreachable_server_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "BACKOFF_SECONDS", 0.0)
    expected = r"cannot download http://127\.0\.0\.1:9/x\.tar\.gz after 5 attempts \(.*refused\).*data\.url.*make demo"
    with pytest.raises(ReprotuneError, match=expected):
        fetch_archive("http://127.0.0.1:9/x.tar.gz", "0" * 32, tmp_path / "out.tar.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.reliability
def test_no_dns_fails_at_once_with_the_offline_hint(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", no_dns)
    with pytest.raises(ReprotuneError, match=r"cannot reach https://example\.invalid/c\.tar\.gz .*make demo"):
        fetch_archive("https://example.invalid/c.tar.gz", "0" * 32, tmp_path / "out.tar.gz")


def test_missing_http_file_is_reported(http_server, tmp_path):
    with pytest.raises(ReprotuneError, match="HTTP 404"):
        fetch_archive(f"{http_server}/nothing.tar.gz", "0" * 32, tmp_path / "out.tar.gz")


def _archive_with(tmp_path: Path, members: dict[str, bytes], extra: tuple[tarfile.TarInfo, ...] = ()) -> Path:
    """A tar.gz of CIFAR batch members, plus `extra` raw entries (links, hostile paths, ...)."""
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def _good_members(n: int = 20) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    batch = {"labels": list(range(10)) * (n // 10), "data": rng.integers(0, 255, (n, 3072), dtype=np.uint8)}
    members = {name: pickle.dumps(batch) for name in [*TRAIN_BATCHES, "test_batch"]}
    members["batches.meta"] = pickle.dumps({"label_names": [f"c{i}" for i in range(10)]})
    return members


class _RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned",))


@pytest.mark.reliability
def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    members = _good_members()
    members["data_batch_3"] = pickle.dumps({"data": _RunsCode(), "labels": []})
    refused = r"data_batch_3 is not a CIFAR batch \(refusing to load (posix|os)\.system\)"
    with pytest.raises(ReprotuneError, match=refused):
        read_archive(_archive_with(tmp_path, members))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.reliability
@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("test_batch"), "test_batch is missing"),
    (lambda m: m.update(data_batch_2=pickle.dumps({"labels": [0], "data": np.zeros((1, 100), np.uint8)})),
     r"'data' must be a uint8 \(N, 3072\) array"),
    (lambda m: m.update(data_batch_2=pickle.dumps({"labels": [0, 10], "data": np.zeros((2, 3072), np.uint8)})),
     "labels outside 0..9"),
    (lambda m: m.update(data_batch_2=pickle.dumps({"labels": [0], "data": np.zeros((2, 3072), np.uint8)})),
     "1 labels for 2 images"),
])
def test_malformed_batches_are_named(tmp_path, change, message):
    members = _good_members()
    change(members)
    with pytest.raises(ReprotuneError, match=message):
        read_archive(_archive_with(tmp_path, members))


@pytest.mark.reliability
def test_not_a_gzip_archive(tmp_path):
    path = tmp_path / "x.tar.gz"
    path.write_text("hello")
    with pytest.raises(ReprotuneError, match="not a readable CIFAR-10 tar.gz archive"):
        read_archive(path)


def test_reads_protocol_2_pickles_with_bytes_keys(tmp_path):
    # Python 3 re-packs at protocol 2 pickle bytes through _codecs.encode(text, 'latin1').
    members = _good_members()
    batch = {b"labels": [1, 2], b"data": np.zeros((2, 3072), np.uint8), b"batch_label": b"x"}
    members["data_batch_1"] = pickle.dumps(batch, protocol=2)
    raw = read_archive(_archive_with(tmp_path, members))
    assert raw.train_labels[:2].tolist() == [1, 2]


def test_stratified_split_is_seeded_and_per_class():
    labels = np.repeat(np.arange(10), 50)
    train, val = stratified_split(labels, 0.2, seed=1)
    again, _ = stratified_split(labels, 0.2, seed=1)
    other, _ = stratified_split(labels, 0.2, seed=2)
    assert np.bincount(labels[val]).tolist() == [10] * 10
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 500


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """augment's float32 output back on the uint8 scale: exact for pixels only cropped and flipped."""
    return x.mul(255).round().to(torch.uint8)


def test_augment_crops_and_flips_on_the_device_without_changing_pixels():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(251).add(1).to(torch.uint8).view(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    out = augment(images, padding=0, hflip=False, generator=gen)
    assert out.dtype == torch.float32 and torch.equal(out, to_float(images))  # the models' input
    flips = [_pixels(augment(images, padding=0, hflip=True, generator=gen)) for _ in range(20)]
    assert all(torch.equal(f[i], images[i]) or torch.equal(f[i], images[i].flip(2)) for f in flips for i in range(2))
    assert any(torch.equal(f[0], images[0].flip(2)) for f in flips)
    crops = [_pixels(augment(images, padding=2, hflip=False, generator=gen, mode="zero")) for _ in range(20)]
    for crop in crops:
        assert crop.shape == images.shape
        # every crop is a shifted window of the zero-padded image
        padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
        for i in range(2):
            windows = [padded[i, :, y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
            assert any(torch.equal(crop[i], w) for w in windows)
    assert any(not torch.equal(c, images) for c in crops)


def test_channel_statistics_are_exact_from_histograms():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 3, 8, 8), dtype=np.uint8)
    images[:, 2] = 7  # a constant channel: mean 7/255, std 0
    mean, std = channel_stats(images)
    pixels = images.astype(np.float64) / 255
    assert mean == pytest.approx(pixels.mean(axis=(0, 2, 3)).tolist(), abs=1e-12)
    assert std == pytest.approx(pixels.std(axis=(0, 2, 3)).tolist(), abs=1e-12)
    assert std[2] == 0.0 and isinstance(mean[0], float) and isinstance(std[0], float)


def test_splits_carry_the_training_split_statistics_and_every_image_once():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 10)
    images = rng.integers(0, 256, (40, 3, 4, 4), dtype=np.uint8)
    test_images = rng.integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)
    raw = RawData(images, labels, test_images, np.arange(6) % 4, ["a", "b", "c", "d"])
    splits = make_splits(raw, 0.3, seed=0)
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert (len(train.labels), len(val.labels), len(test.labels)) == (28, 12, 6)
    train_idx, _ = stratified_split(labels, 0.3, seed=0)
    expected_mean, expected_std = channel_stats(images[train_idx])
    for split in (train, val, test):  # every split is normalized with the training split's statistics
        assert split.mean == expected_mean and split.std == expected_std and split.classes == ["a", "b", "c", "d"]
    everything = torch.cat([train.images, val.images]).flatten(1)
    assert sorted(map(tuple, everything.tolist())) == sorted(map(tuple, torch.from_numpy(images).flatten(1).tolist()))
    assert torch.equal(test.images, torch.from_numpy(test_images)) and train.images.dtype == torch.uint8
    assert to_float(train.images).max() <= 1.0 and to_float(train.images).dtype == torch.float32


@pytest.mark.reliability
def test_a_split_that_would_leave_a_side_empty_is_refused():
    labels = np.arange(10)  # one image per class
    with pytest.raises(ReprotuneError, match=r"data.val_fraction=0.01 leaves an empty split of 10 training images"):
        stratified_split(labels, 0.01, seed=0)  # rounds to 0 per class: no validation images
    with pytest.raises(ReprotuneError, match=r"data.val_fraction=0.99 leaves an empty split"):
        stratified_split(labels, 0.99, seed=0)  # rounds to 1 per class: no training images
    train, val = stratified_split(np.repeat(np.arange(2), 2), 0.5, seed=0)
    assert len(train) == len(val) == 2  # one of each class on each side: not too few to split


def test_crops_use_every_offset_and_flips_about_half():
    # 4 px of padding: 9 x 9 window positions (offsets 0..8 on each axis), every one of them drawn.
    wide = torch.arange(1, 65, dtype=torch.uint8).view(1, 1, 8, 8).repeat(2000, 1, 1, 1)
    crops = _pixels(augment(wide, padding=4, hflip=False, generator=torch.Generator().manual_seed(1), mode="zero"))
    padded = torch.nn.functional.pad(wide[0, 0], (4,) * 4)
    windows = {(y, x): padded[y:y + 8, x:x + 8] for y in range(9) for x in range(9)}
    seen = {next(pos for pos, w in windows.items() if torch.equal(crop[0], w)) for crop in crops[:600]}
    assert seen == set(windows)  # all 81, none outside (next() would fail on a window not among them)
    flipped = _pixels(augment(wide, padding=0, hflip=True, generator=torch.Generator().manual_seed(2)))
    share = (flipped[:, 0, 0, 0] == 8).float().mean().item()  # a mirrored first row starts with 8
    assert 0.45 < share < 0.55
    assert ((flipped[:, 0, 0, 0] == 8) | (flipped[:, 0, 0, 0] == 1)).all()


@pytest.mark.parametrize("rotation, jitter", [(0.0, 0.0), (30.0, 0.5)])
def test_each_rank_gets_its_slice_of_the_global_batch_augmentation(rotation, jitter):
    # Under DDP rank k of n augments the k-th slice of a global batch: it must get exactly the crops,
    # flips, rotations and jitter that slice gets when the whole batch is augmented at once.
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    whole = augment(images, 2, True, torch.Generator().manual_seed(4), rotation=rotation, jitter=jitter)
    for k in range(3):
        part = augment(images[4 * k:4 * (k + 1)], 2, True, torch.Generator().manual_seed(4), part=(k, 3),
                            rotation=rotation, jitter=jitter)
        assert torch.equal(part, whole[4 * k:4 * (k + 1)]), k


def _inside_circle(side: int) -> torch.Tensor:
    """(side, side) True on pixels whose centre lies 2 px or more inside the inscribed circle: what
    a rotation about the centre moves within the image (corners rotate out, zeros rotate in)."""
    centre = (side - 1) / 2
    y, x = torch.meshgrid(torch.arange(side) - centre, torch.arange(side) - centre, indexing="ij")
    return x**2 + y**2 <= (side / 2 - 2) ** 2


def test_rotation_by_quarter_turns_matches_rot90_anticlockwise():
    # At multiples of 90 degrees a square image's pixel centres land on pixel centres: the result is
    # torch.rot90's exactly (up to float rounding), which pins the direction and the axes.
    image = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))  # no symmetry to hide behind
    inside = _inside_circle(12)
    for degrees, expected in ((90, image.rot90(1, (2, 3))), (-90, image.rot90(-1, (2, 3))),
                              (180, image.flip(2, 3))):
        turned = rotate(image, torch.tensor([float(degrees)]))
        torch.testing.assert_close(turned[..., inside], expected[..., inside], atol=1e-5, rtol=0, msg=str(degrees))
    wide = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(1))  # not square: still a half turn
    torch.testing.assert_close(rotate(wide, torch.tensor([180.0])), wide.flip(2, 3), atol=1e-5, rtol=0)


def test_rotating_there_and_back_keeps_the_content():
    # A smooth image turned by +a then -a is itself again inside the circle that rotation keeps,
    # up to bilinear interpolation's blur; one turn alone is far from it.
    side = 32
    y, x = torch.meshgrid(torch.arange(side) / side, torch.arange(side) / side, indexing="ij")
    image = torch.stack([0.5 + 0.4 * torch.sin(2 * math.pi * (x + 2 * y)), 0.5 + 0.4 * torch.cos(4 * math.pi * x),
                         y])[None].repeat(4, 1, 1, 1)  # (4, 3, 32, 32): four images, each turned its own way
    degrees = torch.tensor([7.0, -23.0, 45.0, 160.0])
    inside = _inside_circle(side)
    turned = rotate(image, degrees)
    back = rotate(turned, -degrees)
    assert (back - image)[..., inside].abs().max() < 0.05
    assert ((turned - image)[..., inside].abs().amax((1, 2)) > 0.2).all()  # each image really turned


def test_rotation_angles_are_uniform_within_the_bound():
    # Each image's angle, read back from where augment moved a bright dot 10 px right of the centre,
    # is uniform in [-30, 30] degrees: within the bound, reaching both ends, centred, and close to the
    # uniform distribution function (Kolmogorov-Smirnov distance, fixed seed).
    n, side, bound = 2000, 32, 30.0
    images = torch.zeros(n, 3, side, side, dtype=torch.uint8)
    images[:, :, 15:17, 25:27] = 255  # a 2x2 dot centred at (15.5 + 10, 15.5): radius 10, angle 0
    out = augment(images, 0, False, torch.Generator().manual_seed(0), rotation=bound).sum(1)  # (N, H, W)
    coords = torch.arange(side, dtype=torch.float32) - (side - 1) / 2
    mass = out.sum((1, 2))
    cx = (out.sum(1) * coords).sum(1) / mass
    cy = (out.sum(2) * coords).sum(1) / mass
    angles = torch.rad2deg(torch.atan2(-cy, cx))  # anticlockwise positive, image y pointing down
    assert angles.min() > -bound - 0.5 and angles.max() < bound + 0.5  # the dot's centroid is good to ~0.2 deg
    assert angles.min() < -bound + 1 and angles.max() > bound - 1
    assert abs(angles.mean()) < 1.0  # 3 standard errors: 30 / sqrt(3) / sqrt(2000) = 0.39
    uniform = (angles.sort().values + bound) / (2 * bound)
    ecdf = torch.arange(1, n + 1) / n
    assert (ecdf - uniform).abs().max() < 1.36 / math.sqrt(n)  # KS at 5%: 0.030


def test_jitter_is_torchvisions_colour_jitter_and_stays_in_range():
    # Given factors, each image is torchvision's brightness, then contrast, then saturation
    # adjustment, each clamped to [0, 1]: strong factors on images with black and white in them.
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images[:, :, 0] = 1.0
    images[:, :, 1] = 0.0
    factors = torch.tensor([[2.0, 0.5, 1.5], [0.0, 1.0, 1.0], [1.0, 2.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 2.0],
                            [1.7, 1.9, 1.8]])
    got = jitter_colours(images, factors)
    expected = torch.stack([TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), c), s)
                            for image, (b, c, s) in zip(images, factors.tolist(), strict=True)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert got.min() >= 0 and got.max() <= 1


def test_jitter_factors_are_uniform_per_image_and_strength_zero_draws_nothing():
    # On grey images of two halves (51 and 153 of 255) saturation does nothing, the brightness factor
    # scales the mean and the contrast factor the gap between the halves: both read back, each image
    # its own, uniform in [1 - s, 1 + s].
    n, s = 1000, 0.5
    images = torch.full((n, 3, 4, 4), 51, dtype=torch.uint8)
    images[:, :, 2:] = 153
    out = augment(images, 0, False, torch.Generator().manual_seed(0), jitter=s)
    brightness = out.mean((1, 2, 3)) / (102 / 255)
    contrast = (out[:, 0, 3, 0] - out[:, 0, 0, 0]) / (102 / 255) / brightness
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # still grey
    for factor in (brightness, contrast):
        assert factor.min() >= 1 - s - 1e-5 and factor.max() <= 1 + s + 1e-5
        assert factor.min() < 1 - s + 0.01 and factor.max() > 1 + s - 0.01
        assert abs(factor.mean() - 1) < 0.03  # 3 standard errors: 0.5 / sqrt(3) / sqrt(1000) = 0.009
    assert not torch.allclose(brightness, contrast)  # independent draws, not one factor for all
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    plain = augment(images, 0, False, generator, rotation=0.0, jitter=0.0)
    assert torch.equal(plain, to_float(images)) and torch.equal(generator.get_state(), state)


@pytest.mark.reliability
def test_links_are_refused_and_other_entries_are_never_read_or_extracted(tmp_path, monkeypatch):
    # read_archive reads the layout's own member names in memory: a link in their place is refused,
    # entries with escaping names are never touched, and nothing is extracted to disk at all.
    def no_extraction(*args, **kwargs):
        raise AssertionError("read_archive extracted a member to disk")

    monkeypatch.setattr(tarfile.TarFile, "extract", no_extraction)
    monkeypatch.setattr(tarfile.TarFile, "extractall", no_extraction)
    members = _good_members()
    hostile = [tarfile.TarInfo(name) for name in ("../escaped", "/tmp/absolute-escape", "cifar-10-batches-py/../x")]
    for info in hostile:
        info.size = 1
    raw = read_archive(_archive_with(tmp_path, members, tuple(hostile)))  # beside a whole layout: ignored
    assert raw.train_images.shape == (100, 3, 32, 32) and raw.classes == [f"c{i}" for i in range(10)]
    del members["data_batch_4"]
    link = tarfile.TarInfo("cifar-10-batches-py/data_batch_4")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(ReprotuneError, match="data_batch_4 is a link or special file"):
        read_archive(_archive_with(tmp_path, members, (link, *hostile)))


@pytest.mark.reliability
def test_an_archive_with_too_many_entries_is_refused_early(tmp_path):
    path = tmp_path / "many.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for i in range(MAX_MEMBERS + 1):
            info = tarfile.TarInfo(f"junk/{i}")
            tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ReprotuneError, match="more than 64 entries"):
        read_archive(path)


@pytest.mark.reliability
def test_a_truncated_archive_is_reported(archive, tmp_path):
    path, _ = archive
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ReprotuneError, match="not a readable CIFAR-10 tar.gz archive"):
        read_archive(cut)


@pytest.mark.reliability
def test_a_member_larger_than_any_cifar_batch_is_not_read(archive, monkeypatch):
    path, _ = archive
    monkeypatch.setattr(cifar, "MAX_MEMBER_BYTES", 1000)  # stands in for 512 MiB: the same check
    with pytest.raises(ReprotuneError, match=r"batches.meta is \d+ bytes, more than a CIFAR batch can be|"
                                             r"data_batch_1 is \d+ bytes, more than a CIFAR batch can be"):
        read_archive(path)


def test_a_class_of_two_splits_one_and_one_and_a_class_of_one_stays_in_train():
    train, val = stratified_split(np.array([0, 0, 1]), 0.1, seed=0)
    assert (len(train), len(val)) == (2, 1) and 2 in train  # class 0: one each side; class 1's only image trains
    assert [len(side) for side in stratified_split(np.array([0, 0]), 0.5, seed=0)] == [1, 1]
    assert [held_out(n, 0.1) for n in (1, 2, 5, 6, 100)] == [0, 1, 1, 1, 10]


def _np_window_set(image: np.ndarray, padding: int, mode: str) -> dict[tuple[int, int], np.ndarray]:
    """Every window a crop of `image` (C, H, W) may take, from numpy's own padding."""
    c, h, w = image.shape
    if mode == "mean":
        fill = np.round(image.reshape(c, -1).mean(1)).astype(np.uint8)
        padded = np.stack([np.pad(image[i], padding, constant_values=fill[i]) for i in range(c)])
    else:
        padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)),
                        mode={"reflect": "reflect", "edge": "edge", "zero": "constant"}[mode])
    return {(y, x): padded[:, y:y + h, x:x + w] for y in range(2 * padding + 1) for x in range(2 * padding + 1)}


@pytest.mark.parametrize("mode", PADDING_MODES)
def test_crop_padding_modes_are_numpys_and_reach_every_offset(mode):
    # A window of the padded image, filled as numpy pads (reflect: mirrored without repeating the
    # edge; edge: the border repeated; mean: each channel's mean; zero: black), at all 81 offsets.
    rng = np.random.default_rng(0)
    image = rng.integers(1, 255, (3, 8, 8), dtype=np.uint8)
    windows = _np_window_set(image, 4, mode)
    batch = torch.from_numpy(image)[None].repeat(600, 1, 1, 1)
    crops = _pixels(augment(batch, 4, False, torch.Generator().manual_seed(1), mode=mode)).numpy()
    seen = {next(pos for pos, w in windows.items() if np.array_equal(crop, w)) for crop in crops}
    assert seen == set(windows)


def test_reflect_and_edge_crops_bring_in_no_colour_the_image_lacks():
    # Dark ink on white paper: zero padding draws black borders no image has; the others do not.
    page = torch.full((64, 3, 16, 16), 250, dtype=torch.uint8)
    page[:, :, 6:10, 6:10] = 40
    darkest = {mode: _pixels(augment(page, 4, True, torch.Generator().manual_seed(0), mode=mode)).amin().item()
               for mode in PADDING_MODES}
    assert darkest["zero"] == 0
    assert darkest["reflect"] == darkest["edge"] == 40 and darkest["mean"] == 40


def test_the_padding_mode_draws_nothing_and_only_changes_the_border():
    # The same seed gives the same offsets and flips whatever the mode: pixels read from inside the
    # image agree, and the generator ends in the same state.
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    inside = _pixels(augment(torch.full_like(images, 77), 3, True, torch.Generator().manual_seed(2),
                                  mode="zero")) == 77  # where a window of zero padding reads the image
    outs, states = {}, {}
    for mode in PADDING_MODES:
        gen = torch.Generator().manual_seed(2)
        outs[mode] = _pixels(augment(images, 3, True, gen, mode=mode))
        states[mode] = gen.get_state()
    assert 0 < inside.float().mean() < 1
    for mode in PADDING_MODES:
        assert torch.equal(outs[mode][inside], outs["zero"][inside]), mode
        assert torch.equal(states[mode], states["zero"]), mode
        assert mode == "zero" or not torch.equal(outs[mode], outs["zero"]), mode


@pytest.mark.parametrize("mode, corner", [("reflect", 0.8), ("edge", 0.8), ("mean", 0.8), ("zero", 0.0)])
def test_rotation_fills_its_corners_per_the_padding_mode(mode, corner):
    # A plain page turned 45 degrees: its corners come from outside the image. Only zero fills
    # them black; reflect and edge repeat the page, mean its mean colour.
    page = torch.full((8, 3, 16, 16), 204, dtype=torch.uint8)  # 0.8
    out = augment(page, 0, False, torch.Generator().manual_seed(0), rotation=45.0, mode=mode)
    centre = out[:, :, 6:10, 6:10]
    torch.testing.assert_close(centre, torch.full_like(centre, 0.8), atol=1e-4, rtol=0)
    corners = out[:, :, 0, 0]  # every image turns by its own angle; the bound keeps it near 45 for some
    turned = out.sub(0.8).abs().amax((1, 2, 3)) > 0.1 if mode == "zero" else None
    if mode == "zero":
        assert turned.any() and corners[turned].max() < 0.5
    else:
        torch.testing.assert_close(out, torch.full_like(out, corner), atol=1e-4, rtol=0)


def test_training_augments_with_the_configured_padding_mode():
    # `train.augmented` (the loop, the trial step and the logged batch) passes padding_mode on.
    from reprotune.config import TrainConfig
    from reprotune.training import loop

    page = torch.full((64, 3, 16, 16), 250, dtype=torch.uint8)
    darkest = {mode: loop.augmented(page, TrainConfig(padding_mode=mode, random_crop=4),
                                     torch.Generator().manual_seed(0)).amin().item() for mode in ("zero", "edge")}
    assert darkest == {"zero": 0.0, "edge": pytest.approx(250 / 255)}
