"""The classifier: a torchvision ResNet18 with a new head, wrapped so it owns its input transform.

`Classifier` takes float images in [0, 1], (N, 3, H, W) RGB, and does normalization and resizing
inside its graph, so training, evaluation and every export share one input contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reprotune.config import ModelConfig
from reprotune.errors import ReprotuneError
from reprotune.tensorfiles import load_torch, save_torch

MODEL_FORMAT = "reprotune.model/1"
STAGES = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]  # ResNet order, input first


class Classifier(nn.Module):
    """Normalize with the training split's mean/std, resize to `image_size`, run the ResNet."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], image_size: int):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.image_size = image_size
        self.frozen: list[str] = []  # names of `net` children that must stay in eval mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [0, 1] -> (N, classes)
        x = (images - self.mean) / self.std
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False)
        return self.net(x)

    def train(self, mode: bool = True) -> Classifier:
        # Frozen BatchNorm must not update its running statistics when the rest trains.
        super().train(mode)
        for name in self.frozen:
            getattr(self.net, name).eval()
        return self


def build_model(cfg: ModelConfig, num_classes: int, mean: list[float], std: list[float]) -> Classifier:
    """ResNet18 with `cfg.weights` loaded, the stem chosen, and a fresh head for `num_classes`."""
    net = torchvision.models.resnet18(weights=None)
    if cfg.weights != "none":
        load_backbone(net, imagenet_state_dict() if cfg.weights == "imagenet" else
                      load_torch(Path(cfg.weights), "weights file"), cfg.weights)
    if cfg.stem == "cifar":
        # 32x32 inputs lose most of their pixels to a 7x7/2 conv + max-pool; keep full resolution.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Sequential(nn.Dropout(cfg.dropout), new_head(net.fc.in_features, num_classes, cfg.head_init))
    return Classifier(net, mean, std, cfg.image_size)


def new_head(features: int, num_classes: int, init: str) -> nn.Linear:
    """The classification head, initialized on purpose: Xavier uniform or He normal, zero bias."""
    head = nn.Linear(features, num_classes)
    if init == "xavier":
        nn.init.xavier_uniform_(head.weight)
    else:  # the features come out of ReLU + average pooling: He's fan-in rule for ReLU inputs
        nn.init.kaiming_normal_(head.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(head.bias)
    return head


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 ResNet18 weights, from $TORCH_HOME or downloaded there."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash a RuntimeError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise ReprotuneError(
            f"cannot get ImageNet weights from {weights.url} ({exc}): put that file at {cache} "
            "or set model.weights to a local state-dict path or 'none'") from None


def load_backbone(net: nn.Module, state: Any, source: str) -> None:
    """Load every weight except the classifier head; anything missing or misshapen is an error."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # also accept {"state_dict": ...} checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReprotuneError(f"{source}: not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise ReprotuneError(f"{source}: weights do not fit ResNet18: {detail}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        keys = (missing or unexpected)[:3]
        raise ReprotuneError(f"{source}: weights do not fit ResNet18: "
                             f"{'missing' if missing else 'unexpected'} keys {keys}")


def frozen_stages(strategy: str, unfreeze_from: str, unfreeze_after: int = 0, epoch: int = 1) -> list[str]:
    """ResNet stages frozen in (1-based) `epoch`: full none, partial all before `unfreeze_from`,
    linear all but fc; with `unfreeze_after` N > 0, epoch N + k has its k deepest ones thawed."""
    first = {"full": 0, "partial": STAGES.index(unfreeze_from), "linear": STAGES.index("fc")}[strategy]
    thawed = max(0, epoch - unfreeze_after) if unfreeze_after else 0
    return STAGES[:max(0, first - thawed)]


def apply_strategy(model: Classifier, frozen: list[str]) -> None:
    """Freeze exactly the `frozen` stages (parameters and BatchNorm statistics), train the rest."""
    model.frozen = list(frozen)
    for name in STAGES:
        getattr(model.net, name).requires_grad_(name not in model.frozen)
    model.train(model.training)


# The saved model (models/model.pt, models/model.compressed.pt): a plain dict, so that it loads with
# torch.load(weights_only=True). What crosses stages in it is typed here, one place for its keys.
class Compression(TypedDict):
    """How the compress stage made a model: its compress.* params (CompressConfig's fields, which
    tests/test_records.py keeps equal to these), and what its gate said."""

    ratio: float
    importance: str
    epochs: int
    min_steps: int
    lr: float
    distill: float
    temperature: float
    max_acc_drop: float
    gate: str
    flops_ratio: float  # pruned FLOPs / the fine-tuned model's
    accepted: bool  # within compress.max_acc_drop of the unpruned model's test accuracy
    verdict: str | None  # why not, when it was not


class ModelExtras(TypedDict, total=False):
    """The optional part of a saved model: where it came from and how well it validated."""

    seed: int
    train: dict[str, Any]  # TrainConfig.model_dump(mode="json") of the run that trained it
    input_size: int  # the side of the cached images it is fed (32 for CIFAR)
    best_epoch: int | None  # the epoch whose weights these are
    val_acc: float | None  # their validation accuracy
    compression: Compression  # only in the compress stage's model


class SavedModel(ModelExtras):
    """Everything needed to rebuild the model and feed it."""

    format: str  # MODEL_FORMAT
    state_dict: dict[str, torch.Tensor]
    model: dict[str, Any]  # ModelConfig.model_dump()
    classes: list[str]
    mean: list[float]  # per channel, on the [0, 1] scale: the training split's
    std: list[float]


def save_model(path: Path, model: Classifier, cfg: ModelConfig, classes: list[str], extra: ModelExtras) -> None:
    """Write weights plus everything needed to rebuild the model and feed it, as a plain dict."""
    saved: SavedModel = {
        "format": MODEL_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": cfg.model_dump(),
        "classes": list(classes),
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
        **extra,
    }
    save_torch(path, saved)


def load_model(path: Path) -> tuple[Classifier, SavedModel]:
    """Rebuild a saved Classifier (eval mode, CPU) and return it with its saved metadata."""
    saved = load_torch(path, "reprotune model")
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        raise ReprotuneError(f"{path}: not a reprotune model (rerun the finetune stage)")
    cfg = ModelConfig.model_validate({**saved["model"], "weights": "none"})
    model = build_model(cfg, len(saved["classes"]), saved["mean"], saved["std"])
    if saved.get("compression"):  # pruned: fewer channels than the architecture's defaults
        fit_widths(model, saved["state_dict"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved


def fit_widths(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each conv, BatchNorm and linear layer the channel counts of its weights in `state`.

    A structurally pruned model is the same architecture with narrower layers, so it is rebuilt from
    plain tensors. (Torch-Pruning's own serialization pickles whole modules, which
    `torch.load(weights_only=True)`, the only way we read files, refuses.)
    """
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if weight is None or weight.shape == module.weight.shape:
            continue
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(weight.shape[1] * module.groups, weight.shape[0], module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.bias is not None)
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(weight.shape[0], module.eps, module.momentum)
        elif isinstance(module, nn.Linear):
            new = nn.Linear(weight.shape[1], weight.shape[0], module.bias is not None)
        else:
            raise ReprotuneError(f"{name}: a {type(module).__name__} cannot change its width")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
