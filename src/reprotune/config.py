"""Validated configuration: one pydantic model per `params.yaml` section.

Unknown or misspelled keys, wrong types and out-of-range values are rejected with one line that
names the file, the key and, for a misspelling, the closest valid key. Field defaults equal the
shipped `params.yaml` (a test keeps the two in step); each field's docstring is its documentation.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from reprotune.errors import ReprotuneError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


class Section(BaseModel):
    # extra="forbid": a misspelled key is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class DataConfig(Section):
    dataset: Literal["cifar10", "synthetic"] = "cifar10"
    """`cifar10` fetches `url`; `synthetic` generates a learnable CIFAR-format archive offline."""
    url: str = CIFAR10_URL
    """Where the CIFAR-10 python archive comes from: http(s)://, file:// or a local path."""
    md5: str = CIFAR10_MD5
    """Expected md5 of the archive at `url`; a mismatch is an error."""
    val_fraction: float = Field(0.1, gt=0, lt=1)
    """Fraction of the training batches held out (stratified) for validation."""
    synthetic_train: int = Field(50_000, ge=10)
    """Training images in the synthetic archive (CIFAR-10 has 50,000)."""
    synthetic_test: int = Field(10_000, ge=10)
    """Test images in the synthetic archive (CIFAR-10 has 10,000)."""

    @field_validator("md5")
    @classmethod
    def _md5_is_hex(cls, value: str) -> str:
        if len(value) != 32 or any(c not in "0123456789abcdef" for c in value.lower()):
            raise ValueError("must be 32 hexadecimal digits")
        return value.lower()


class ModelConfig(Section):
    arch: Literal["resnet18"] = "resnet18"
    """torchvision architecture."""
    weights: str = "imagenet"
    """`imagenet` (torchvision's IMAGENET1K_V1 through $TORCH_HOME), `none`, or a state-dict path."""
    stem: Literal["imagenet", "cifar"] = "imagenet"
    """`imagenet` keeps the 7x7/2 conv + max-pool; `cifar` uses a 3x3/1 conv and no max-pool."""
    image_size: int = Field(32, ge=16, le=512)
    """Side in pixels the images are resized to on the device before the network."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout probability before the new classification head."""


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    """Passes over the training split."""
    batch_size: int = Field(128, ge=1)
    """Images per optimizer step."""
    lr: float = Field(0.01, gt=0)
    """Peak learning rate (per batch of `batch_size`)."""
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"
    """Optimizer; `momentum` applies to sgd and rmsprop."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum for sgd and rmsprop."""
    weight_decay: float = Field(5e-4, ge=0)
    """L2 penalty (decoupled for adamw)."""
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    """LR schedule over all steps: cosine to zero, or step decay by `step_gamma` every `step_epochs`."""
    step_epochs: int = Field(3, ge=1)
    """Epochs between decays for the step scheduler."""
    step_gamma: float = Field(0.1, gt=0, le=1)
    """Decay factor for the step scheduler."""
    amp: Literal["auto", "fp16", "bf16", "off"] = "auto"
    """Mixed precision: auto = fp16 with a GradScaler on CUDA, off on CPU."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value (0 = off); unscaled first under fp16."""
    strategy: Literal["full", "partial", "linear"] = "full"
    """Which parameters train: all, from `unfreeze_from` on (plus head), or the head only."""
    unfreeze_from: Literal["layer1", "layer2", "layer3", "layer4"] = "layer3"
    """First ResNet stage that trains under the partial strategy."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Cross-entropy label smoothing."""
    random_crop: int = Field(4, ge=0, le=16)
    """Random-crop padding in pixels (0 = no crop augmentation)."""
    hflip: bool = True
    """Random horizontal flips."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`."""

    @field_validator("device")
    @classmethod
    def _device_spelling(cls, value: str) -> str:
        head, _, index = value.partition(":")
        if value in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")


class LogConfig(Section):
    histograms: bool = True
    """Weight and gradient histograms each epoch."""
    images: int = Field(32, ge=0, le=256)
    """Images in the augmented-batch and per-split sample grids (0 = none)."""
    graph: bool = True
    """Write the model graph once."""


class EvaluateConfig(Section):
    batch_size: int = Field(512, ge=1)
    """Images per forward pass."""


class ExportConfig(Section):
    opset: int = Field(18, ge=13, le=23)
    """ONNX opset version."""
    check_images: int = Field(64, ge=2)
    """Test images the exported models are checked on against PyTorch."""
    tolerance: float = Field(1e-3, gt=0)
    """Largest allowed absolute logit difference between an export and PyTorch."""


class Params(Section):
    seed: int = 0
    """Seeds the split, the initial head, shuffling and augmentation."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        frozen = self.train.strategy != "full"
        if frozen and self.model.weights == "none":
            raise ValueError(f"train.strategy={self.train.strategy} freezes layers, but "
                             "model.weights=none leaves them random: use strategy full or real weights")
        if frozen and self.model.stem == "cifar":
            raise ValueError(f"model.stem=cifar replaces the first conv with an untrained one, which "
                             f"train.strategy={self.train.strategy} would freeze: use strategy full")
        return self


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; any problem raises ReprotuneError naming file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ReprotuneError(f"{path}: no such params file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ReprotuneError(f"{path}: cannot read params: {_first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ReprotuneError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ReprotuneError(f"{path}: {_describe(exc.errors()[0], raw)}") from None


# Names other tools use for our keys, which spelling similarity alone would not suggest.
_ALIASES = {"learning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "bs": "batch_size",
            "wd": "weight_decay", "optim": "optimizer", "lr_scheduler": "scheduler",
            "clip_grad_norm": "grad_clip", "max_grad_norm": "grad_clip", "mixed_precision": "amp",
            "pretrained": "weights", "img_size": "image_size", "input_size": "image_size"}


def _describe(error: dict[str, Any], raw: dict) -> str:
    """One line for the first pydantic error, with a spelling suggestion for unknown keys."""
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "params"
    if error["type"] == "extra_forbidden":
        model: type[BaseModel] = Params
        for part in loc[:-1]:
            model = model.model_fields[part].annotation
        fields = list(model.model_fields)
        alias = _ALIASES.get(loc[-1].lower())
        close = [alias] if alias in fields else difflib.get_close_matches(loc[-1], fields, n=1)
        hint = f" (did you mean '{'.'.join(loc[:-1] + close)}'?)" if close else ""
        return f"unknown key '{key}'{hint}"
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and error["type"] != "missing" and not isinstance(error["input"], dict):
        return f"{key}: {message} (got {error['input']!r})"
    return f"{key}: {message}"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
