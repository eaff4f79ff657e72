"""Building the classifier: weights from a file or torchvision's cache, stems, freezing."""

from __future__ import annotations

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from fixtures import MEAN, STD
from reprotune.config import ModelConfig
from reprotune.errors import ReprotuneError
from reprotune.training.device import amp_dtype, select_device
from reprotune.training.model import apply_strategy, build_model, frozen_stages, load_model, save_model


def _same_backbone(model, state):
    return all(torch.equal(model.net.state_dict()[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_weights_from_a_state_dict_path(weights_file):
    model = build_model(ModelConfig(weights=str(weights_file)), 10, MEAN, STD)
    assert _same_backbone(model, torch.load(weights_file, weights_only=True))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_imagenet_weights_come_through_torchvision_and_torch_home(weights_file, tmp_path, monkeypatch):
    # Exactly where torchvision looks for IMAGENET1K_V1: $TORCH_HOME/hub/checkpoints/<file name>.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights_file.read_bytes())
    model = build_model(ModelConfig(weights="imagenet"), 10, MEAN, STD)
    assert _same_backbone(model, torch.load(weights_file, weights_only=True))


@pytest.mark.reliability
def test_imagenet_weights_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    expected = r"cannot get ImageNet weights .* put that file at .*hub/checkpoints/resnet18-"
    with pytest.raises(ReprotuneError, match=expected):
        build_model(ModelConfig(weights="imagenet"), 10, MEAN, STD)


@pytest.mark.reliability
def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"conv1.weight": torch.zeros(1, 1, 1, 1)}, path)
    with pytest.raises(ReprotuneError, match=r"weights do not fit ResNet18: .*conv1.weight"):
        build_model(ModelConfig(weights=str(path)), 10, MEAN, STD)
    torch.save([1, 2, 3], path)
    with pytest.raises(ReprotuneError, match="not a state dict"):
        build_model(ModelConfig(weights=str(path)), 10, MEAN, STD)
    with pytest.raises(ReprotuneError, match="weights file not found"):
        build_model(ModelConfig(weights=str(tmp_path / "missing.pt")), 10, MEAN, STD)


@pytest.mark.reliability
def test_weights_file_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ReprotuneError, match="not a readable weights file"):
        build_model(ModelConfig(weights=str(path)), 10, MEAN, STD)


def test_cifar_stem_keeps_resolution_and_image_size_resizes():
    model = build_model(ModelConfig(weights="none", stem="cifar", image_size=48), 10, MEAN, STD)
    shapes = []
    model.net.layer1.register_forward_hook(lambda m, i, o: shapes.append(o.shape) and None)
    model(torch.rand(2, 3, 32, 32))
    assert shapes == [(2, 64, 48, 48)]  # resized to 48, no stride-2 conv, no max-pool
    assert model.net.conv1.bias is None  # a BatchNorm follows it, as after every ResNet conv


@pytest.mark.parametrize("strategy, trained", [
    ("full", {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}),
    ("partial", {"layer3", "layer4", "fc"}),
    ("linear", {"fc"}),
])
def test_strategies_freeze_layers_and_their_batchnorm(strategy, trained):
    model = build_model(ModelConfig(weights="none"), 10, MEAN, STD)
    apply_strategy(model, frozen_stages(strategy, "layer3"))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    loss = model(torch.rand(8, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    with_grad = {n.split(".")[1] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trained
    after = model.state_dict()
    for key, value in before.items():
        layer = key.split(".")[1]
        assert torch.equal(after[key], value) == (layer not in trained), key


def test_saved_model_round_trips(tmp_path):
    model = build_model(ModelConfig(weights="none", dropout=0.2), 3, MEAN, STD).eval()
    save_model(tmp_path / "m.pt", model, ModelConfig(weights="none", dropout=0.2), ["a", "b", "c"], {"best_epoch": 4})
    loaded, saved = load_model(tmp_path / "m.pt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert saved["classes"] == ["a", "b", "c"] and saved["best_epoch"] == 4
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ReprotuneError, match="not a reprotune model"):
        load_model(tmp_path / "other.pt")


@pytest.mark.reliability
def test_device_choice():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    missing = torch.cuda.device_count()  # one past the last GPU (cuda:0 on a machine without any)
    with pytest.raises(ReprotuneError, match=rf"train.device=cuda:{missing} but (this machine has no CUDA device"
                                             rf"|only {missing} CUDA device\(s\) exist)"):
        select_device(f"cuda:{missing}")
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("auto", torch.device("cuda")) is torch.float16
    assert amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16


# Backward nodes of the ops torch's docs list as having no deterministic CUDA kernel (they raise
# under torch.use_deterministic_algorithms) among those a vision model might use.
NO_DETERMINISTIC_CUDA_BACKWARD = {
    "AdaptiveAvgPool2DBackward0", "AdaptiveMaxPool2DBackward0", "AvgPool3DBackward0", "FractionalMaxPool2DBackward0",
    "UpsampleLinear1DBackward0", "UpsampleBilinear2DBackward0", "UpsampleBicubic2DBackward0",
    "UpsampleTrilinear3DBackward0", "ReflectionPad1DBackward0", "ReflectionPad2DBackward0", "GridSampler2DBackward0",
    "NllLoss2DBackward0",
}


def _backward_ops(tensor: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_training_graph_has_no_op_without_a_deterministic_cuda_backward(stem, image_size, channels_last):
    # Why train.deterministic can hold on CUDA: the resize to model.image_size acts on the input
    # images, which need no gradient, so bilinear resizing's backward never runs; and ResNet's
    # adaptive average pooling to 1x1 is computed by torch as a mean over H and W (MeanBackward),
    # on every device. The graph is built the same way on CPU and CUDA, so the CPU shows it.
    model = build_model(ModelConfig(weights="none", stem=stem, image_size=image_size), 10, MEAN, STD).train()
    images = torch.rand(2, 3, 32, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([1, 2]), label_smoothing=0.1)
    ops = _backward_ops(loss)
    assert "ConvolutionBackward0" in ops and "MeanBackward1" in ops  # the walk sees the whole network
    assert ops & NO_DETERMINISTIC_CUDA_BACKWARD == set()


def _head(init: str, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return build_model(ModelConfig(weights="none", head_init=init), 10, MEAN, STD).net.fc[1]


def test_the_xavier_head_fills_its_whole_uniform_range():
    # Xavier/Glorot uniform for 512 -> 10: U(-a, a), a = sqrt(6 / 522) = 0.107, std a / sqrt(3).
    # PyTorch's own Linear default is U(-1/sqrt(512), 1/sqrt(512)) = +-0.044: it also stays within
    # a, so the spread is what tells them apart.
    head, bound = _head("xavier"), math.sqrt(6 / (512 + 10))
    assert head.weight.abs().max() <= bound and head.weight.abs().max() > 0.95 * bound
    assert head.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.equal(head.bias, torch.zeros(10))  # the default bias would be uniform, not zero


def test_the_kaiming_head_is_normal_with_he_fan_in_variance():
    head, std = _head("kaiming"), math.sqrt(2 / 512)
    assert head.weight.std().item() == pytest.approx(std, rel=0.05)
    # normal, not uniform: of 5,120 weights, about 8% lie beyond Xavier's bound of 1.71 std
    beyond = (head.weight.abs() > math.sqrt(6 / 522)).float().mean().item()
    assert 0.05 < beyond < 0.12
    assert torch.equal(head.bias, torch.zeros(10))


def test_gradual_unfreezing_thaws_deepest_stages_first():
    assert frozen_stages("linear", "layer3", 2, 1) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert frozen_stages("linear", "layer3", 2, 2) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert frozen_stages("linear", "layer3", 2, 3) == ["conv1", "bn1", "layer1", "layer2", "layer3"]
    assert frozen_stages("partial", "layer3", 1, 3) == ["conv1", "bn1"]
    assert frozen_stages("partial", "layer3", 1, 9) == []
    assert frozen_stages("partial", "layer3", 0, 9) == ["conv1", "bn1", "layer1", "layer2"]
    assert frozen_stages("full", "layer3", 0, 5) == [] and frozen_stages("full", "layer3", 2, 5) == []
    assert frozen_stages("partial", "layer4") == ["conv1", "bn1", "layer1", "layer2", "layer3"]  # the defaults:
    assert frozen_stages("partial", "layer4", 3, 3) == frozen_stages("partial", "layer4")  # N epochs, then thaw
    assert frozen_stages("partial", "layer4", 3, 4) == ["conv1", "bn1", "layer1", "layer2"]


def _state(**changes):
    torch.manual_seed(5)
    state = torchvision.models.resnet18().state_dict()
    state.update(changes)
    return state


def test_backbone_weights_load_from_the_usual_checkpoint_shapes(tmp_path):
    plain = _state()
    for name, saved in (("plain", plain), ("wrapped", {"state_dict": plain, "epoch": 3}),
                        ("ddp", {f"module.{k}": v for k, v in plain.items()})):
        torch.save(saved, tmp_path / f"{name}.pt")
        model = build_model(ModelConfig(weights=str(tmp_path / f"{name}.pt")), 10, MEAN, STD)
        assert _same_backbone(model, plain), name


@pytest.mark.reliability
def test_weights_that_miss_or_add_keys_name_the_first_three(tmp_path):
    state = _state()
    missing = [k for k in state if k.startswith("layer4.")][:5]  # in the model's own order
    for key in missing:
        del state[key]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ReprotuneError) as error:
        build_model(ModelConfig(weights=str(tmp_path / "missing.pt")), 10, MEAN, STD)
    assert str(error.value).endswith(f"weights do not fit ResNet18: missing keys {missing[:3]}")
    torch.save(_state(**{"extra.weight": torch.zeros(1), "more.bias": torch.zeros(1)}), tmp_path / "extra.pt")
    with pytest.raises(ReprotuneError) as error:
        build_model(ModelConfig(weights=str(tmp_path / "extra.pt")), 10, MEAN, STD)
    assert str(error.value).endswith("weights do not fit ResNet18: unexpected keys ['extra.weight', 'more.bias']")


@pytest.mark.parametrize("side", [40, 32])
def test_the_network_sees_normalized_images_resized_the_way_the_exports_do(side):
    # What reaches the first conv: (x - mean) / std, then (when the side differs from
    # model.image_size) torch's bilinear resize with align_corners=False, which ONNX and predict share.
    model = build_model(ModelConfig(weights="none", image_size=40), 10, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]).eval()
    seen = []
    model.net.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side))
    model(x)
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    expected = F.interpolate((x - mean) / std, size=(40, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen[0], expected)
