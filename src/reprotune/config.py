"""Validated configuration: one pydantic model per `params.yaml` section.

Unknown or misspelled keys, wrong types and out-of-range values are rejected with one line that
names the file, the key and, for a misspelling, the closest valid key. These classes are the one
source of every default and its description: `params.yaml` and the parameter reference
(docs/reference/parameters.md) are written from them (`reprotune params --write`, see paramsdoc.py), and a
test keeps them in step.
"""

from __future__ import annotations

import difflib
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from reprotune.errors import ParamsError, first_line

# The official archive of each named dataset (URL, md5): used when data.url / data.md5 are empty.
# Imagenette: fast.ai's ten easy ImageNet classes at 160 px (the md5s are torchvision's).
OFFICIAL = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
    "imagenette": ("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
                   "e793b78cc4c9e9a4ccc0c1155377a412"),
}
DOWNLOADED = "data/raw/download"  # the download stage's output directory: the archive, under its own name
CIFAR_SIDE = 32


class Section(BaseModel):
    # extra="forbid": a misspelled key is an error, never a silently ignored setting. strict: a
    # quoted "512" is a string, not a batch size (ints still count as floats).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


# YAML has no tuples: a two-element list is accepted where a pair is expected.
Pair = Annotated[tuple[float, float], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)]


class DataConfig(Section):
    """Where the images come from, at what size they are cached, and how they are split."""

    dataset: Literal["cifar10", "cifar100", "imagenette", "folder", "synthetic"] = "cifar10"
    """cifar10 | cifar100 | imagenette | folder (your images: `path` or `url`) | synthetic (offline)

    `folder` reads one subfolder per class, from a local tree (`path`) or an archive of one (`url`);
    `imagenette` is such an archive, fetched from its official URL. `synthetic` is a learnable
    10-class set (5 colours x 2 stripe orientations) in the CIFAR-10 archive layout, generated
    offline, that runs the code real data takes."""
    url: str = ""
    """where the archive comes from: https://, file:///path or a plain path; empty: the official one"""
    md5: str = ""
    """md5 of the archive at `url`; empty: the official archive's. A mismatch fails the download

    Required with a `folder` dataset's `url`: an archive is trusted only by its checksum."""
    path: str = DOWNLOADED
    """what preprocess reads: the download stage's directory, or your image tree (dataset folder)

    Track your tree with `dvc add` (or git): editing one image then reruns preprocess and what
    follows it, nothing before."""
    image_size: int = Field(CIFAR_SIDE, ge=8, le=1024)
    """px, side of the cached square images (folder datasets; CIFAR's are 32)

    Aspect-preserving resize of the shorter side, then a centre crop, as `reprotune predict`
    does; the model still resizes to `model.image_size` on the device."""
    cifar100_labels: Literal["fine", "coarse"] = "fine"
    """cifar100 only: fine (100 classes) | coarse (20 superclasses)"""
    val_fraction: float = Field(0.1, gt=0, lt=1)
    """share of each class of the training images held out for validation (seeded)"""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """share of each class held out for testing, for a folder tree without a test/ or val/ root

    Seeded by a fixed seed, not `seed`: a seed sweep compares its runs on the same test images."""
    on_bad_image: Literal["skip", "fail"] = "skip"
    """skip (count them in skipped_images, list the first few) | fail (stop at the first)"""
    synthetic_train: int = Field(50_000, ge=10)
    """images, synthetic dataset only (CIFAR-10 has 50,000)"""
    synthetic_test: int = Field(10_000, ge=10)
    """images, synthetic dataset only (CIFAR-10 has 10,000)"""
    synthetic_seed: int = 0
    """seeds the synthetic images (apart from `seed`: a seed sweep keeps the archive)

    So `dvc exp run -S seed=1` reuses the archive instead of rerunning the download stage."""

    @field_validator("md5")
    @classmethod
    def _md5_is_hex(cls, value: str) -> str:
        if value and (len(value) != 32 or any(c not in "0123456789abcdef" for c in value.lower())):
            raise ValueError("must be 32 hexadecimal digits")
        return value.lower()

    @model_validator(mode="after")
    def _source_is_clear(self) -> DataConfig:
        if self.dataset == "folder":
            if not self.url and self.path == DOWNLOADED:
                raise ValueError("data.dataset=folder needs data.path (your image tree, one subfolder per "
                                 "class) or data.url (an archive of one)")
            if self.url and self.path != DOWNLOADED:
                raise ValueError(f"data.url and data.path={self.path} both name the images: set one")
            if self.url and not self.md5:
                raise ValueError("data.md5 is required with data.url for a folder archive "
                                 "(`md5sum` of the file gives it)")
        elif self.path != DOWNLOADED:
            raise ValueError(f"data.path is for dataset folder; {self.dataset} is read from what the "
                             f"download stage writes ({DOWNLOADED}): leave data.path at its default")
        if self.dataset in ("cifar10", "cifar100", "synthetic") and self.image_size != CIFAR_SIDE:
            raise ValueError(f"data.image_size={self.image_size}: {self.dataset} images are {CIFAR_SIDE} px "
                             f"(set model.image_size to train at another size)")
        return self

    @property
    def source(self) -> tuple[str, str]:
        """(url, md5) of the archive to fetch: the given ones, else the dataset's official ones."""
        url, md5 = OFFICIAL.get(self.dataset, ("", ""))
        return self.url or url, self.md5 or md5

    @property
    def folder(self) -> bool:
        """A folder dataset (one subfolder per class), read by data/folders.py; else a CIFAR archive."""
        return self.dataset in ("folder", "imagenette")

    @property
    def archive(self) -> Path | None:
        """Where the download stage puts the archive (None: a local tree, nothing to fetch)."""
        if self.dataset == "synthetic":
            return Path(DOWNLOADED) / "cifar-10-python.tar.gz"
        url = self.source[0]
        if not url:
            return None
        return Path(DOWNLOADED) / Path(urllib.parse.urlsplit(url).path if "://" in url else url).name


class ModelConfig(Section):
    """The network: ResNet18, its starting weights, its first layer and its new head."""

    arch: Literal["resnet18"] = "resnet18"
    """torchvision architecture"""
    weights: str = "imagenet"
    """imagenet (torchvision IMAGENET1K_V1 via $TORCH_HOME) | none | path/to/state_dict.pt"""
    stem: Literal["imagenet", "cifar"] = "imagenet"
    """imagenet (7x7/2 conv + max-pool) | cifar (3x3/1 conv, no max-pool: 16x the FLOPs at 32 px)

    `cifar` replaces the first conv with an untrained one, so it needs `train.strategy: full`."""
    image_size: int = Field(32, ge=16, le=512)
    """px; images are resized on the device (224 = classic ImageNet transfer, ~49x the FLOPs)"""
    dropout: float = Field(0.0, ge=0, lt=1)
    """probability, before the new head"""
    head_init: Literal["xavier", "kaiming"] = "xavier"
    """new head's weights: xavier (Glorot uniform) | kaiming (He normal, fan-in); bias 0"""


class TrainConfig(Section):
    """Fine-tuning: optimizer, schedule, precision, clipping, strategy, augmentation, devices."""

    epochs: int = Field(10, ge=1)
    """passes over the training split (fewer if early stopping fires)"""
    batch_size: int = Field(128, ge=1)
    """images per optimizer step, global: each of N processes takes 1/N

    A trailing partial batch is dropped; each epoch reshuffles, so every image is still seen."""
    lr: float = Field(0.01, gt=0)
    """peak LR of the new head per batch of batch_size; fine-tuning wants ~10x less than from scratch"""
    backbone_lr_mult: float = Field(1.0, gt=0, le=1)
    """the pretrained backbone's LR as a fraction of lr (e.g. 0.1)"""
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "sgd"
    """sgd | adam | adamw (decoupled decay) | rmsprop

    `momentum` applies to sgd and rmsprop, `nesterov` to sgd, `betas` to adam and adamw."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """sgd and rmsprop"""
    nesterov: bool = False
    """sgd: Nesterov momentum"""
    betas: Pair = (0.9, 0.999)
    """adam and adamw: moment decay rates"""
    weight_decay: float = Field(5e-4, ge=0)
    """L2 penalty (decoupled for adamw)"""
    decay_norm_and_bias: bool = False
    """also decay BatchNorm weights and biases (by default they get none; it usually hurts)"""
    scheduler: Literal["cosine", "step", "onecycle", "none"] = "cosine"
    """per optimizer step after warmup: cosine (to 0) | step | onecycle | none

    `onecycle` is torch's OneCycleLR: 30% of the steps up from lr/25, cosine down to lr/25/1e4, no
    momentum cycling."""
    warmup_epochs: float = Field(0.0, ge=0)
    """linear warmup from 1% of lr over this many epochs (fractions ok; not with onecycle)"""
    step_epochs: int = Field(3, ge=1)
    """step scheduler: epochs between decays, counted after warmup"""
    step_gamma: float = Field(0.1, gt=0, le=1)
    """step scheduler: lr multiplier at each decay"""
    amp: Literal["auto", "fp16", "bf16", "off"] = "auto"
    """auto (fp16 + GradScaler on CUDA, off on CPU) | fp16 | bf16 | off

    bf16 autocast is slow on CPUs, so auto leaves the CPU in fp32."""
    grad_clip: float = Field(1.0, ge=0)
    """global-norm threshold on the unscaled gradients; 0 = off (docs/explanation/gradient-clipping.md: why 1.0)

    At 1.0 nearly every step is clipped (gradient norms run 3-10), so SGD takes normalized-gradient
    steps: measured the better recipe (`python bench/clipping.py`, bench/results/clipping.md)."""
    grad_clip_mode: Literal["norm", "value"] = "norm"
    """norm (global L2 norm <= grad_clip) | value (each element within +-grad_clip)"""
    strategy: Literal["full", "partial", "linear"] = "full"
    """full (all layers) | partial (from unfreeze_from on, plus the head) | linear (head only)

    Frozen BatchNorm layers keep their running statistics."""
    unfreeze_from: Literal["layer1", "layer2", "layer3", "layer4"] = "layer3"
    """partial: the first ResNet stage that trains (layer1..layer4)"""
    unfreeze_after: int = Field(0, ge=0)
    """gradual unfreezing: after N epochs thaw one more stage per epoch, deepest first; 0 = never"""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """cross-entropy target smoothing"""
    random_crop: int = Field(4, ge=0, le=16)
    """px of padding (filled per padding_mode) for random crops; 0 = off"""
    padding_mode: Literal["reflect", "edge", "mean", "zero"] = "reflect"
    """what fills pixels from outside the image (crop padding, rotation corners): reflect | edge | mean | zero

    reflect mirrors the image's own pixels, edge repeats its border, mean is each image's mean colour,
    zero is black (the old default: it draws borders that data with a light background never has).
    Measured on real data (`python bench/recipes.py`, bench/results/recipes.md)."""
    hflip: bool = True
    """random horizontal flips"""
    rotation: float = Field(0.0, ge=0, le=180)
    """degrees, random rotations uniform in +-rotation (bilinear, corners per padding_mode); 0 = off

    Anticlockwise for a positive draw, after the crop and flip: one `grid_sample` for the whole
    batch on the device; e.g. 15."""
    color_jitter: float = Field(0.0, ge=0, le=1)
    """strength s: brightness, contrast and saturation factors uniform in [1-s, 1+s]; 0 = off

    Three factors per image, applied in that order as torchvision's ColorJitter(s, s, s) applies
    each (clamped to [0, 1]), after the rotation; e.g. 0.4."""
    ema_decay: float = Field(0.0, ge=0, lt=1)
    """per-step EMA of the weights, validated and saved when on (e.g. 0.999); 0 = off"""
    early_stop_patience: int = Field(0, ge=0)
    """epochs without improvement of early_stop_metric before stopping; 0 = off"""
    early_stop_metric: Literal["val_acc", "val_loss"] = "val_acc"
    """val_acc | val_loss: picks the saved (best) epoch and drives early stopping"""
    channels_last: bool = False
    """NHWC memory format (faster convolutions on tensor-core GPUs)"""
    compile: bool = False
    """torch.compile the training model: tens of seconds to compile; pays off on long GPU runs

    Measured: about 40 s for ResNet18 on 2 CPU cores, cold."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: bitwise-repeatable runs, sometimes slower

    See docs/explanation/resume.md, "What bitwise means"."""
    device: str = "auto"
    """auto (CUDA when present; of several GPUs, one no other run holds) | cpu | cuda | cuda:N

    Under DDP each process takes its own GPU (`cuda:LOCAL_RANK`)."""
    data_on: Literal["auto", "device", "host", "disk"] = "auto"
    """auto | device | host | disk: where the cached uint8 images live while training

    device: all on the GPU (on a CPU, as host). host: all in memory (pinned for a GPU), each batch
    gathered there and copied asynchronously. disk: left in the cache files, each batch read by
    index a few steps ahead on a background thread (for datasets larger than memory). auto: device
    if they fit beside training on the GPU, else host if they fit in half the available memory
    (a cgroup's limit counted), else disk. Every choice trains the same for the same seed."""
    nproc: int = Field(1, ge=1)
    """training processes per machine, one per GPU; above 1 launches DDP through torchrun"""
    nnodes: int = Field(1, ge=1)
    """machines; the one running `dvc repro` is node 0 (docs/how-to/gpus-and-clusters.md)"""
    rdzv_endpoint: str = "localhost:29500"
    """host:port of node 0, where the other machines join (nnodes > 1 only)"""
    sync_bn: bool = False
    """SyncBatchNorm: BatchNorm statistics over the global batch (CUDA only)

    Otherwise each process normalizes its own slice of the batch."""

    @field_validator("device")
    @classmethod
    def _device_spelling(cls, value: str) -> str:
        head, _, index = value.partition(":")
        if value in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint_spelling(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return value
        raise ValueError("must be host:port, e.g. node0.example.com:29500")

    @property
    def world_size(self) -> int:
        """Training processes in all: `nproc` per node times `nnodes`."""
        return self.nproc * self.nnodes


class LogConfig(Section):
    """What TensorBoard gets besides the scalars."""

    histograms: bool = True
    """weight and gradient histograms each epoch"""
    images: int = Field(32, ge=0, le=256)
    """images per sample grid in TensorBoard; 0 = none"""
    graph: bool = True
    """the model graph, once"""


class EvaluateConfig(Section):
    """The test-set report."""

    batch_size: int = Field(512, ge=1)
    """images per forward pass"""
    tta: bool = False
    """also report flip test-time augmentation (mean logits of image and mirror)"""
    calibration_bins: int = Field(15, ge=2, le=100)
    """confidence bins for the expected calibration error and the reliability diagram"""
    misclassified_images: int = Field(16, ge=0, le=64)
    """most confidently misclassified test images shown in TensorBoard"""


class CompressConfig(Section):
    """Structured pruning of whole channels (Torch-Pruning), then a recovery fine-tune."""

    ratio: float = Field(0.0, ge=0, le=0.9)
    """global share of prunable channels removed; 0 = off (the stage copies the model, in a second)

    Global: layers lose channels by their importance against every other layer's, not each the
    same share, and no layer loses more than 90%. FLOPs fall about as (1 - ratio)^2; ~0.2 halves
    ResNet18's. The head's outputs are never pruned."""
    importance: Literal["magnitude", "lamp", "fpgm", "random"] = "magnitude"
    """magnitude (L2 of each channel group) | lamp | fpgm (geometric median) | random (the control)"""
    epochs: int = Field(3, ge=0)
    """recovery fine-tune after pruning, through finetune's loop and `train` settings; 0 = none"""
    min_steps: int = Field(500, ge=0)
    """optimizer steps the recovery takes at least: `epochs` is raised to cover them; 0 = `epochs` alone

    Recovery needs about as many steps whatever the dataset's size: 3 epochs are 1,000 steps on
    CIFAR-10 but 54 on 1,200 images (issue 23: 60 steps left a pruned model 20 points short)."""
    lr: float = Field(0.01, gt=0)
    """peak LR of the recovery fine-tune (all layers train; `train.scheduler` shapes it)"""
    distill: float = Field(0.0, ge=0, le=1)
    """weight of distillation from the unpruned model in the recovery loss; 0 = plain cross-entropy

    loss = (1 - distill) * cross-entropy + distill * T^2 * KL(teacher || student), both at temperature T."""
    temperature: float = Field(4.0, gt=0)
    """distillation temperature T: softens both models' class probabilities"""
    max_acc_drop: float = Field(0.01, ge=0, le=1)
    """most test accuracy the compressed model may lose against the unpruned one (0.01 = 1 point)

    Test, like the int8 gate: validation picked the recovery's best epoch, so it flatters the
    compressed model. A model past the gate is still written, with `accepted: false` in
    metrics/compress.json, and export leaves `models/compressed/` with only `rejected.json`."""
    gate: Literal["optional", "required"] = "optional"
    """optional (a compressed model past `max_acc_drop` is not exported, with a warning) | required (fails)"""


class MonitorConfig(Section):
    """Drift checks of new images against the validation split (`reprotune monitor`, the monitor stage)."""

    alpha: float = Field(0.05, gt=0, lt=1)
    """false-alarm rate of a whole check: each of the three test families gets alpha / 3 (Bonferroni)"""
    permutations: int = Field(500, ge=99)
    """relabellings behind the feature test's p-value (its smallest possible value is 1 / (permutations + 1))"""


class ExportConfig(Section):
    """ONNX, int8 ONNX, TorchScript and optionally ExecuTorch, each verified before it is written."""

    opset: int = Field(18, ge=13, le=23)
    """ONNX opset"""
    check_images: int = Field(64, ge=2)
    """test images each export is checked on against PyTorch"""
    tolerance: float = Field(1e-3, gt=0)
    """max allowed |logit difference| between an fp32 export and PyTorch"""
    calibration_images: int = Field(256, ge=1)
    """training images that calibrate the int8 model's activation ranges"""
    int8_min_agreement: float = Field(0.9, ge=0, le=1)
    """min share of test images where the int8 model's class equals PyTorch's"""
    int8: Literal["optional", "required"] = "optional"
    """optional (an int8 model below the gate is left out, with a warning) | required (fails)

    Left out means `models/int8/` holds only the verdict, `rejected.json`, and `metrics/export.json`
    records it."""
    latency_runs: int = Field(50, ge=1)
    """batch-1 calls timed per export (the median is reported)"""
    executorch: bool = False
    """also write ExecuTorch programs for phones: `models/executorch/` (XNNPACK, fp32 + int8 .pte)

    Needs the `mobile` extra (`pip install -e '.[mobile]'`). Verified like the others: fp32 within
    `tolerance`, int8 through `int8_min_agreement` and `int8`. When false, `models/executorch/`
    holds only a note saying so."""
    executorch_max_batch: int = Field(32, ge=1)
    """largest batch one .pte call takes (ExecuTorch plans its buffers for it; 1 = a fixed batch of 1)"""


class Params(Section):
    seed: int = 0
    """seeds the validation split, the new head, dropout, shuffling and augmentation"""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compress: CompressConfig = CompressConfig()
    export: ExportConfig = ExportConfig()
    monitor: MonitorConfig = MonitorConfig()
    _source: Path | None = PrivateAttr(None)  # the file these came from, for errors found later

    def error(self, message: str) -> ParamsError:
        """A one-line error about these params' values, found after loading (a GPU that is not
        there, say), naming the params file as load errors do; raised before anything is written."""
        return ParamsError(f"{self._source}: {message}" if self._source else message)

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        frozen = self.train.strategy != "full"
        if frozen and self.model.weights == "none":
            raise ValueError(f"train.strategy={self.train.strategy} freezes layers, but "
                             "model.weights=none leaves them random: use strategy full or real weights")
        if self.train.warmup_epochs and self.train.scheduler == "onecycle":
            raise ValueError("train.warmup_epochs does not apply to train.scheduler=onecycle, "
                             "which warms up by itself: set warmup_epochs to 0")
        if self.train.warmup_epochs >= self.train.epochs:
            raise ValueError(f"train.warmup_epochs={self.train.warmup_epochs} must be less than "
                             f"train.epochs={self.train.epochs}")
        world = self.train.world_size
        if self.train.batch_size % world:
            raise ValueError(f"train.batch_size={self.train.batch_size} is the global batch and must divide "
                             f"evenly among train.nproc x train.nnodes = {world} processes")
        if world > 1 and self.train.device.startswith("cuda:"):
            raise ValueError(f"train.device={self.train.device} names one GPU, but {world} processes "
                             "train: use auto or cuda, and each process takes the GPU of its local rank")
        if frozen and self.model.stem == "cifar":
            raise ValueError(f"model.stem=cifar replaces the first conv with an untrained one, which "
                             f"train.strategy={self.train.strategy} would freeze: use strategy full")
        return self


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    silently keeps the last, so an edit above a forgotten duplicate would do nothing)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in first:
                raise _DuplicateKey(key, first[key].start_mark.line + 1, key_node.start_mark.line + 1)
            first[key] = key_node
        return super().construct_mapping(node, deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first_line: int, second_line: int):
        super().__init__(key, first_line, second_line)
        self.key, self.lines = key, (first_line, second_line)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; any problem raises ParamsError naming file and key."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except _DuplicateKey as exc:
        raise ParamsError(f"{path}: key '{exc.key}' appears twice in one section, at lines {exc.lines[0]} "
                             f"and {exc.lines[1]}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ParamsError(f"{path}: {where}not valid YAML: {exc.problem or exc.context}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ParamsError(f"{path}: cannot read params: {first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(f"{path}: {describe(exc.errors()[0], raw)}") from None
    params._source = path
    return params


# Names other tools use for our keys, which spelling similarity alone would not suggest.
_ALIASES = {"learning_rate": "lr", "num_epochs": "epochs", "n_epochs": "epochs", "bs": "batch_size",
            "wd": "weight_decay", "optim": "optimizer", "lr_scheduler": "scheduler",
            "clip_grad_norm": "grad_clip", "max_grad_norm": "grad_clip", "mixed_precision": "amp",
            "pretrained": "weights", "img_size": "image_size", "input_size": "image_size"}


def describe(error: dict[str, Any], raw: dict | None = None) -> str:
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

