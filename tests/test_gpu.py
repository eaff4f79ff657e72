"""The headline path on a real GPU: CUDA, AMP, clipping, channels_last, torch.compile, determinism.

Every test here is marked `gpu`: skipped with its reason on a machine without CUDA, run by
`make gpu-check` on one that has it (with tests/test_resume.py's CUDA variants: Ctrl-C mid-epoch
and SIGKILL, each resumed bitwise). They drive the same code as the CPU suite, on `cuda`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fixtures import REPO, run, set_params, synthetic_splits
from reprotune.config import Params
from reprotune.data.splits import load_split, save_split
from reprotune.training.checkpoint import Checkpoints
from reprotune.training.loop import finetune

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def splits():
    return synthetic_splits(2000, 200, 0.2)


def _fit(splits, tmp_path, name="run", model=None, **train_cfg):
    params = Params.model_validate({
        "model": {"weights": "none", **(model or {})}, "log": {"graph": False, "images": 4},
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.05, "device": "cuda", **train_cfg}})
    return finetune(params, splits["train"], splits["val"], Checkpoints(tmp_path / name, name))


def _learned(result) -> None:
    """Trained on the GPU, finite everywhere, and well above chance (0.1) on the synthetic classes."""
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values() if v.dtype.is_floating_point)
    assert result.metrics["best_val_acc"] > 0.3, result.history
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_fp16_with_grad_scaler_and_clipping_skips_overflowing_steps(splits, tmp_path, monkeypatch):
    # A loss scale of 2**40 makes the first steps' fp16 gradients overflow for certain: GradScaler
    # must skip those steps and lower the scale, and the run must neither fail nor call it divergence.
    original = torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, "__init__",
                        lambda self, *args, **kwargs: original(self, *args, **{**kwargs, "init_scale": 2.0**40}))
    result = _fit(splits, tmp_path, amp="fp16", grad_clip=1.0)
    _learned(result)
    assert result.history[0]["loss_scale"] <= 2.0**30  # at least ten overflows, each halving the scale
    assert 0 < result.history[0]["clip_fraction"] <= 1  # clipping measured on the unscaled gradients


def test_bf16_autocast(splits, tmp_path):
    result = _fit(splits, tmp_path, amp="bf16")
    _learned(result)
    assert result.history[0]["loss_scale"] == 1.0  # bf16 needs no GradScaler


def test_channels_last_with_fp16(splits, tmp_path):
    _learned(_fit(splits, tmp_path, amp="fp16", channels_last=True))


def test_torch_compile_trains_the_model_it_returns(splits, tmp_path):
    torch.manual_seed(0)
    result = _fit(splits, tmp_path, compile=True, amp="fp16", epochs=2)
    _learned(result)  # the returned (uncompiled) model carries what the compiled one learned


@pytest.mark.parametrize("image_size, channels_last", [(32, False), (64, True)])
def test_deterministic_runs_are_bitwise_equal_on_cuda(splits, tmp_path, image_size, channels_last):
    # cuBLAS needs its workspace config, cuDNN its deterministic algorithms; resizing to 64 px and
    # channels_last take other kernels. Two runs must agree to the bit.
    runs = [_fit(splits, tmp_path, name, {"image_size": image_size}, deterministic=True, amp="fp16",
                 channels_last=channels_last, epochs=2) for name in ("a", "b")]
    for key, value in runs[0].model.state_dict().items():
        assert torch.equal(value, runs[1].model.state_dict()[key]), key
    _learned(runs[0])


def test_device_host_and_disk_cache_train_bitwise_alike_on_cuda(splits, tmp_path):
    """The three places the images may live (train.data_on), with fp16 and deterministic kernels:
    the same batches reach the GPU (disk: read into pinned buffers on the prefetch thread and
    copied asynchronously), so the weights agree to the bit."""
    for name, split in splits.items():
        save_split(split, tmp_path / f"{name}.pt")
    cached = {name: load_split(tmp_path / f"{name}.pt") for name in splits}
    runs = {where: _fit(cached, tmp_path, where, deterministic=True, amp="fp16", epochs=2, data_on=where)
            for where in ("device", "host", "disk")}
    for where in ("host", "disk"):
        for key, value in runs["device"].model.state_dict().items():
            assert torch.equal(value, runs[where].model.state_dict()[key]), (where, key)
    _learned(runs["disk"])


def test_evaluate_and_export_a_model_trained_on_cuda(tmp_path):
    root = tmp_path
    (root / "data/processed").mkdir(parents=True)
    for name, split in synthetic_splits(1000, 200, 0.2, seed=1).items():
        save_split(split, root / "data/processed" / f"{name}.pt")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    set_params(root / "params.yaml", {"model.weights": "none", "train.epochs": 3, "train.batch_size": 64,
                                      "train.lr": 0.05, "train.device": "cuda", "export.int8_min_agreement": 0.5,
                                      "export.latency_runs": 5})
    for stage in ("finetune", "evaluate", "export"):
        run(["python", str(REPO / f"stages/{stage}.py")], root)
    train = json.loads((root / "metrics/train.json").read_text())
    evaluate = json.loads((root / "metrics/evaluate.json").read_text())
    export = json.loads((root / "metrics/export.json").read_text())
    assert train["images_per_second"] > 0 and math.isfinite(train["final_train_loss"])
    assert evaluate["test_acc"] > 0.3
    for fmt in ("onnx", "torchscript"):
        assert export[fmt]["max_abs_diff"] < 1e-3 and export[fmt]["test_acc"] == pytest.approx(evaluate["test_acc"])
    assert Path(root / "models/int8/model.int8.onnx").is_file()
