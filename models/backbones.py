"""Backbones in plain ``torch.nn`` with torchvision's parameter names, so ImageNet files from torchvision load.

Every backbone returns a dict of named feature maps and exposes ``channels`` (name -> channel count) and
``strides`` (name -> input pixels per feature pixel), so heads never hard-code them.

* :class:`ResNet` (resnet18/34/50/101): ``conv1, bn1, layer1..layer4`` with BasicBlock/Bottleneck blocks named
  ``conv1/bn1/conv2/bn2/(conv3/bn3)/downsample.0/.1``; ``width`` scales every channel count;
  ``output_stride`` 8 or 16 replaces the last strides by dilation (PSPNet style: every block of a dilated
  layer uses the layer's dilation).
* :class:`VGG16`: ``features.N`` exactly as torchvision, plus the FCN paper's "convolutionalised" classifier
  ``fc6`` (7×7 conv) and ``fc7`` (1×1 conv), which take torchvision's ``classifier.0/.3`` weights.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor, nn

from app.errors import first_line
from models.errors import CheckpointError, ModelError


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` times the width multiplier, rounded, at least 1."""
    return max(1, int(round(channels * width)))


def _check_width(width: float) -> float:
    if not isinstance(width, (int, float)) or isinstance(width, bool) or width <= 0:
        raise ModelError(f"width must be a positive number, got {width!r}")
    return float(width)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3×3 convolution without bias (a BatchNorm follows); padding keeps the size at stride 1."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1×1 convolution without bias."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 residual block: two 3×3 convs. N×C_in×H×W -> N×planes×H/stride×W/stride."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50/101 block (torchvision v1.5: stride on the 3×3). N×C_in×H×W -> N×4·planes×H/stride×W/stride."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]

# Per output stride: (stride, dilation) of layer1..layer4.
_RESNET_LAYOUTS: MappingProxyType[int, tuple[tuple[int, int], ...]] = MappingProxyType({
    32: ((1, 1), (2, 1), (2, 1), (2, 1)),
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
})


class ResNet(nn.Module):
    """ResNet feature extractor without the ImageNet classifier.

    ``forward``: N×in_channels×H×W -> {"layer1": 1/4, "layer2": 1/8, "layer3": 1/16 or 1/8,
    "layer4": 1/32, 1/16 or 1/8 of the input, per ``output_stride``}. ``forward_stem`` runs
    conv1/bn1/relu/maxpool only (1/4), so cascades such as ICNet can enter the stages separately.
    """

    first_conv = "conv1"

    def __init__(self, block: Block, layers: tuple[int, int, int, int], *, in_channels: int = 3,
                 width: float = 1.0, output_stride: int = 32) -> None:
        super().__init__()
        width = _check_width(width)
        if output_stride not in _RESNET_LAYOUTS:
            raise ModelError(f"output_stride must be one of {sorted(_RESNET_LAYOUTS)}, got {output_stride!r}")
        stem_channels = scaled(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = stem_channels
        stride_so_far = 4
        self.channels: dict[str, int] = {"stem": stem_channels}
        self.strides: dict[str, int] = {"stem": 4}
        for index, (blocks, (stride, dilation)) in enumerate(zip(layers, _RESNET_LAYOUTS[output_stride],
                                                                   strict=True)):
            planes = scaled(64 * 2**index, width)
            name = f"layer{index + 1}"
            setattr(self, name, self._make_layer(block, channels, planes, blocks, stride, dilation))
            channels = planes * block.expansion
            stride_so_far *= stride
            self.channels[name] = channels
            self.strides[name] = stride_so_far
        self._init_weights()

    @staticmethod
    def _make_layer(block: Block, in_channels: int, planes: int, blocks: int, stride: int,
                    dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or in_channels != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(in_channels, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(in_channels, planes, stride, dilation, downsample)]
        layers += [block(planes * block.expansion, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Zero the last BatchNorm of every residual branch (Goyal et al., 2017): a fresh network starts
        # near the identity, so activations stay O(1) at any depth (ResNet-101 logits otherwise reach
        # thousands, overflowing fp16 and drowning parity checks) and training from scratch is steadier.
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)
            elif isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def forward_stem(self, x: Tensor) -> Tensor:
        """N×in_channels×H×W -> N×channels["stem"]×H/4×W/4 (rounded up)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features: dict[str, Tensor] = {}
        x = self.forward_stem(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            features[name] = x
        return features

    @staticmethod
    def from_imagenet(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision ImageNet state_dict -> this module's keys (the ``fc`` classifier is dropped)."""
        return {key: value for key, value in state.items() if not key.startswith("fc.")}


# torchvision's configuration "D"; "M" is a 2×2 max pool.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG16 with the classifier turned into convolutions, as in FCN (Long et al., 2015).

    ``forward``: N×in_channels×H×W -> {"pool3": 1/8, "pool4": 1/16, "pool5": 1/32, "fc7": 1/32}; sizes
    round up (pools use ``ceil_mode`` like Caffe's, so no input pixel is dropped). ``fc6`` is a 7×7 conv
    padded by 3 so any input of at least 32 pixels works (the original pads the image by 100 instead).
    """

    first_conv = "features.0"

    def __init__(self, *, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        width = _check_width(width)
        layers: list[nn.Module] = []
        channels = in_channels
        self._taps: dict[int, str] = {}
        pools = 0
        for entry in _VGG16_LAYOUT:
            if entry == "M":
                pools += 1
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
                if pools >= 3:
                    self._taps[len(layers) - 1] = f"pool{pools}"
            else:
                out_channels = scaled(int(entry), width)
                layers += [nn.Conv2d(channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
                channels = out_channels
        self.features = nn.Sequential(*layers)
        fc_channels = scaled(4096, width)
        self.fc6 = nn.Conv2d(channels, fc_channels, 7, padding=3)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.5)
        self.channels = {"pool3": scaled(256, width), "pool4": channels, "pool5": channels, "fc7": fc_channels}
        self.strides = {"pool3": 8, "pool4": 16, "pool5": 32, "fc7": 32}
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features: dict[str, Tensor] = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._taps:
                features[self._taps[index]] = x
        x = self.dropout(self.relu(self.fc6(x)))
        features["fc7"] = self.dropout(self.relu(self.fc7(x)))
        return features

    def from_imagenet(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision ImageNet state_dict -> this module's keys: ``classifier.0``/``.3`` (Linear) become the
        ``fc6``/``fc7`` convolutions (the FCN paper's recipe); the 1000-class ``classifier.6`` is dropped."""
        converted = {key: value for key, value in state.items() if not key.startswith("classifier.")}
        for linear, name in (("classifier.0", "fc6"), ("classifier.3", "fc7")):
            if f"{linear}.weight" in state:
                weight = state[f"{linear}.weight"]
                conv_shape = getattr(self, name).weight.shape
                # Left as is when the sizes differ, so the shape check names the mismatch.
                if weight.numel() == conv_shape.numel():
                    weight = weight.reshape(conv_shape)
                converted[f"{name}.weight"] = weight
            if f"{linear}.bias" in state:
                converted[f"{name}.bias"] = state[f"{linear}.bias"]
        return converted


_RESNETS: MappingProxyType[str, tuple[Block, tuple[int, int, int, int]]] = MappingProxyType({
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
})

RESNET_NAMES: tuple[str, ...] = tuple(_RESNETS)


def build_resnet(name: str, *, in_channels: int = 3, width: float = 1.0, output_stride: int = 32) -> ResNet:
    """ResNet by name (``resnet18``/``resnet34``/``resnet50``/``resnet101``); unknown name -> ModelError."""
    if name not in _RESNETS:
        raise ModelError(f"unknown backbone '{name}'; valid backbones: {', '.join(RESNET_NAMES)}")
    block, layers = _RESNETS[name]
    return ResNet(block, layers, in_channels=in_channels, width=width, output_stride=output_stride)


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """Turn an RGB first-layer kernel (O×3×k×k) into one for ``in_channels`` inputs.

    The RGB kernels are averaged and repeated, scaled by 3/in_channels so that a gray image fed as
    ``in_channels`` copies gives the response the RGB network gives to the same gray image as RGB
    (for one channel this is the sum over R, G, B).
    """
    if weight.shape[1] == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (weight.shape[1] / in_channels)


def load_backbone_weights(backbone: ResNet | VGG16, path: str | Path) -> None:
    """Load a torchvision ImageNet checkpoint (a plain state_dict file) into ``backbone`` in place.

    The ImageNet classifier is dropped (VGG's ``classifier.0/.3`` become ``fc6``/``fc7``), the first conv
    is adapted to the backbone's input channels (:func:`adapt_first_conv`). Missing file, unreadable file,
    or keys/shapes that do not match (e.g. a width other than 1) -> :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: backbone weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for corrupt files; the message is what matters
        raise CheckpointError(f"{path}: cannot read backbone weights ({first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a torchvision state_dict (expected a mapping of names to tensors)")
    converted = backbone.from_imagenet(state)
    own = backbone.state_dict()
    first = f"{backbone.first_conv}.weight"
    if first in converted and first in own:
        converted[first] = adapt_first_conv(converted[first], own[first].shape[1])
    # Old torchvision files predate BatchNorm's step counter; it does not affect inference.
    missing = [k for k in own if k not in converted and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in converted if k not in own]
    wrong_shape = [f"{k} {tuple(converted[k].shape)} vs {tuple(own[k].shape)}"
                   for k in converted if k in own and converted[k].shape != own[k].shape]
    problems = [f"{label}: {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong_shape))
                if items]
    if problems:
        raise CheckpointError(f"{path}: does not fit the {type(backbone).__name__} backbone ("
                              f"{'; '.join(problems)}); torchvision weights need width=1")
    backbone.load_state_dict(converted, strict=False)

