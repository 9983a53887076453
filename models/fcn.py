"""Fully convolutional networks (Long, Shelhamer & Darrell, CVPR 2015) and their ResNet descendants.

* :class:`FCNVGG`: FCN-32s / FCN-16s / FCN-8s on VGG16: score the fc7 map, fuse ×2-upsampled scores with
  scores of pool4 (16s) and pool3 (8s), upsample to the input with deconvolutions initialised to
  bilinear interpolation, crop to the input size.
* :class:`FCNResNet`: ResNet at output stride 8 (dilated layer3/layer4) with torchvision's FCN head, and
  an optional auxiliary head on layer3.
* :class:`FCNMultiScale`: a hypercolumn classifier: layer1..layer4 features brought to 1/4 resolution,
  combined by a 1×1 conv, BN, ReLU and a 1×1 classifier, then upsampled to the input.

Eval mode: N×C×H×W -> N×K×H×W logits (any H, W ≥ 32). Training mode: {"out": logits} plus "aux" (logits
at the layer3 resolution) when the auxiliary head is on.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.backbones import VGG16, build_resnet, scaled
from models.errors import ModelError
from models.heads import BilinearUpsample, FCNHead, crop_to, resize

FCN_VGG_STRIDES = (32, 16, 8)


class FCNVGG(nn.Module):
    """FCN-``stride``s on VGG16 (stride 32, 16 or 8): the classic skip architecture."""

    def __init__(self, num_classes: int, in_channels: int, *, stride: int = 8, width: float = 1.0) -> None:
        super().__init__()
        if stride not in FCN_VGG_STRIDES:
            raise ModelError(f"FCN stride must be one of {FCN_VGG_STRIDES}, got {stride}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.stride = stride
        self.default_loss_weights = {"out": 1.0}
        self.backbone = VGG16(in_channels=in_channels, width=width)
        channels = self.backbone.channels
        self.score_fr = nn.Conv2d(channels["fc7"], num_classes, 1)
        if stride <= 16:
            self.upscore2 = BilinearUpsample(num_classes, 2)
            self.score_pool4 = self._zero_conv(channels["pool4"], num_classes)
        if stride == 8:
            self.upscore_pool4 = BilinearUpsample(num_classes, 2)
            self.score_pool3 = self._zero_conv(channels["pool3"], num_classes)
        self.upscore = BilinearUpsample(num_classes, stride)

    @staticmethod
    def _zero_conv(in_channels: int, num_classes: int) -> nn.Conv2d:
        # Zero skip scores make a fresh FCN-16s/8s start out as the coarser net (the paper's staged training).
        conv = nn.Conv2d(in_channels, num_classes, 1)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        features = self.backbone(x)
        score = self.score_fr(features["fc7"])
        if self.stride <= 16:
            skip = self.score_pool4(features["pool4"])
            score = crop_to(self.upscore2(score), skip.shape[-2:]) + skip
        if self.stride == 8:
            skip = self.score_pool3(features["pool3"])
            score = crop_to(self.upscore_pool4(score), skip.shape[-2:]) + skip
        out = crop_to(self.upscore(score), x.shape[-2:])
        return {"out": out} if self.training else out


class FCNResNet(nn.Module):
    """ResNet FCN at output stride 8 with torchvision's layout (``backbone``, ``classifier``,
    ``aux_classifier``), so torchvision ``fcn_resnet50/101`` checkpoints fit at width 1."""

    def __init__(self, num_classes: int, in_channels: int, *, backbone: str = "resnet50", width: float = 1.0,
                 aux: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.backbone = build_resnet(backbone, in_channels=in_channels, width=width, output_stride=8)
        self.classifier = FCNHead(self.backbone.channels["layer4"], num_classes)
        self.aux_classifier = FCNHead(self.backbone.channels["layer3"], num_classes) if aux else None
        self.default_loss_weights = {"out": 1.0, "aux": 0.4} if aux else {"out": 1.0}

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        features = self.backbone(x)
        out = resize(self.classifier(features["layer4"]), x.shape[-2:])
        if not self.training:
            return out
        outputs = {"out": out}
        if self.aux_classifier is not None:
            outputs["aux"] = self.aux_classifier(features["layer3"])
        return outputs


class FCNMultiScale(nn.Module):
    """Multi-scale ResNet FCN: every stage contributes to a pixel-wise classifier at 1/4 resolution.

    The first classifier layer is a 1×1 conv over the concatenation of the four stages upsampled to 1/4.
    A 1×1 conv over a concatenation is the sum of one 1×1 conv per part, and it commutes with bilinear
    upsampling, so each stage is projected at its own resolution and the projections are upsampled and
    summed: the same function, without a 1/4-resolution tensor of all backbone channels.
    """

    stages = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes: int, in_channels: int, *, backbone: str = "resnet50", width: float = 1.0,
                 aux: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.backbone = build_resnet(backbone, in_channels=in_channels, width=width, output_stride=32)
        hidden = scaled(256, width)
        self.project = nn.ModuleDict({
            name: nn.Conv2d(self.backbone.channels[name], hidden, 1, bias=False) for name in self.stages
        })
        self.fuse = nn.Sequential(nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(hidden, num_classes, 1)
        self.aux_classifier = FCNHead(self.backbone.channels["layer3"], num_classes) if aux else None
        self.default_loss_weights = {"out": 1.0, "aux": 0.4} if aux else {"out": 1.0}

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        features = self.backbone(x)
        quarter = features["layer1"].shape[-2:]
        hidden = self.project["layer1"](features["layer1"])
        for name in self.stages[1:]:
            hidden = hidden + resize(self.project[name](features[name]), quarter)
        out = resize(self.classifier(self.fuse(hidden)), x.shape[-2:])
        if not self.training:
            return out
        outputs = {"out": out}
        if self.aux_classifier is not None:
            outputs["aux"] = self.aux_classifier(features["layer3"])
        return outputs
