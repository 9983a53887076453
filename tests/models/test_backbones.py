"""Backbones: torchvision parameter names, strides, and loading torchvision-style ImageNet files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import CheckpointError
from models.backbones import VGG16, build_resnet, load_backbone_weights


def test_resnet_uses_torchvision_names() -> None:
    with torch.device("meta"):
        keys = set(build_resnet("resnet50").state_dict())
        basic = set(build_resnet("resnet18").state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
            "layer1.0.downsample.1.bias", "layer4.2.bn3.weight"} <= keys
    assert {"layer2.0.downsample.0.weight", "layer4.1.bn2.weight"} <= basic
    assert not any(key.startswith("fc.") for key in keys | basic)


def test_vgg16_uses_torchvision_feature_indices() -> None:
    with torch.device("meta"):
        keys = {key for key in VGG16().state_dict() if key.startswith("features.")}
    conv_indices = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    assert keys == {f"features.{i}.{p}" for i in conv_indices for p in ("weight", "bias")}


@pytest.mark.parametrize(("output_stride", "expected"), [(32, (8, 4, 2, 1)), (16, (8, 4, 2, 2)), (8, (8, 4, 4, 4))])
def test_resnet_output_stride(output_stride: int, expected: tuple[int, ...]) -> None:
    backbone = build_resnet("resnet18", width=0.125, output_stride=output_stride).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 32, 32))
    assert tuple(features[f"layer{i}"].shape[-1] for i in range(1, 5)) == expected
    assert all(features[name].shape[1] == backbone.channels[name] for name in features)


def _torchvision_file(path: Path, backbone: torch.nn.Module, extra: dict[str, torch.Tensor]) -> dict:
    """Simulate a torchvision ImageNet file: the backbone's RGB weights plus the classifier keys."""
    state = {k: v.clone() for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    state.update(extra)
    torch.save(state, path)
    return state


def test_resnet_weights_load_with_grayscale_conv1(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_resnet("resnet18", in_channels=3, width=0.25)
    path = tmp_path / "resnet18.pth"
    state = _torchvision_file(path, source, {"fc.weight": torch.randn(1000, 128), "fc.bias": torch.zeros(1000)})
    target = build_resnet("resnet18", in_channels=1, width=0.25)
    load_backbone_weights(target, path)
    loaded = target.state_dict()
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(loaded["layer3.1.bn2.running_mean"], state["layer3.1.bn2.running_mean"])
    # A gray frame gives the RGB network's response to the same frame in three channels.
    gray = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target.eval().forward_stem(gray), source.eval().forward_stem(gray.repeat(1, 3, 1, 1)),
                                   rtol=1e-4, atol=1e-4)


def test_vgg_classifier_becomes_fc6_fc7(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = VGG16(in_channels=3, width=0.125)
    fc6, fc7 = source.fc6, source.fc7
    classifier = {"classifier.0.weight": fc6.weight.reshape(fc6.out_channels, -1), "classifier.0.bias": fc6.bias,
                  "classifier.3.weight": fc7.weight.reshape(fc7.out_channels, -1), "classifier.3.bias": fc7.bias,
                  "classifier.6.weight": torch.randn(1000, fc7.out_channels), "classifier.6.bias": torch.zeros(1000)}
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc")}
    path = tmp_path / "vgg16.pth"
    torch.save({**state, **{k: v.detach().clone() for k, v in classifier.items()}}, path)
    target = VGG16(in_channels=3, width=0.125)
    load_backbone_weights(target, path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_mismatched_weights_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    _torchvision_file(path, build_resnet("resnet18", width=0.25), {})
    with pytest.raises(CheckpointError, match="shape"):
        load_backbone_weights(build_resnet("resnet18", width=0.5), path)
    with pytest.raises(CheckpointError, match="missing"):
        load_backbone_weights(build_resnet("resnet34", width=0.25), path)


@pytest.mark.parametrize("content", [None, b"not a checkpoint", "nested"])
def test_unreadable_backbone_files(tmp_path: Path, content: bytes | str | None) -> None:
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "nested":
        torch.save({"model": {"conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_backbone_weights(build_resnet("resnet18", width=0.25), path)
