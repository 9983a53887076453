"""Fully convolutional networks (Long, Shelhamer & Darrell, CVPR 2015) and their ResNet descendants.

* :class:`FCNVGG`: FCN-32s / FCN-16s / FCN-8s on VGG16: score the fc7 map, fuse ×2-upsampled scores with
  scores of pool4 (16s) and pool3 (8s), upsample to the input with deconvolutions initialised to
  bilinear interpolation, crop to the input size.
* :class:`FCNResNet`: ResNet at output stride 8 (dilated layer3/layer4) with torchvision's FCN head, and
  an optional auxiliary head on layer3.
* :class:`FCNMultiScale`: a hypercolumn classifier: layer1..layer4 features brought to 1/4 resolution,
  combined by a 1×1 conv, BN, ReLU and a 1×1 classifier, then upsampled to the input.

All keep the :class:`~models.base.SegmentationModel` contract. Eval mode: N×C×H×W -> N×K×H×W logits (any
H, W ≥ 32). Training mode: {"out": logits} plus "aux" (logits at the layer3 resolution) when the auxiliary
head is on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.backbones import VGG16, build_resnet, scaled
from models.base import SegmentationModel
from models.errors import ModelError
from models.heads import BilinearUpsample, FCNHead, crop_to, resize

FCN_VGG_STRIDES = (32, 16, 8)


def _aux_on_layer3(head: nn.Module | None,
                   features: dict[str, Tensor]) -> Callable[[], dict[str, Tensor]] | None:
    """The ResNet FCNs' auxiliary output: ``head`` on the layer3 features, computed only when asked."""
    return None if head is None else (lambda: {"aux": head(features["layer3"])})


class FCNVGG(SegmentationModel):
    """FCN-``stride``s on VGG16 (stride 32, 16 or 8): the classic skip architecture."""

    def __init__(self, num_classes: int, in_channels: int, *, stride: int = 8, width: float = 1.0) -> None:
        if stride not in FCN_VGG_STRIDES:
            raise ModelError(f"FCN stride must be one of {FCN_VGG_STRIDES}, got {stride}")
        super().__init__(num_classes, in_channels, default_loss_weights={"out": 1.0})
        self.stride = stride
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
        return self.outputs(score, x.shape[-2:])

    def upsample(self, logits: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
        """The learned ×stride deconvolution, cropped to ``size`` (the paper's upsampling, not a resize)."""
        return crop_to(self.upscore(logits), size)


class FCNResNet(SegmentationModel):
    """ResNet FCN at output stride 8 with torchvision's layout (``backbone``, ``classifier``,
    ``aux_classifier``), so torchvision ``fcn_resnet50/101`` checkpoints fit at width 1."""

    def __init__(self, num_classes: int, in_channels: int, *, backbone: str = "resnet50", width: float = 1.0,
                 aux: bool = False) -> None:
        super().__init__(num_classes, in_channels, aux_names=("aux",) if aux else (),
                         default_loss_weights={"out": 1.0, "aux": 0.4} if aux else {"out": 1.0})
        self.backbone = build_resnet(backbone, in_channels=in_channels, width=width, output_stride=8)
        self.classifier = FCNHead(self.backbone.channels["layer4"], num_classes)
        self.aux_classifier = FCNHead(self.backbone.channels["layer3"], num_classes) if aux else None

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        features = self.backbone(x)
        logits = self.classifier(features["layer4"])
        return self.outputs(logits, x.shape[-2:], _aux_on_layer3(self.aux_classifier, features))


class FCNMultiScale(SegmentationModel):
    """Multi-scale ResNet FCN: every stage contributes to a pixel-wise classifier at 1/4 resolution.

    The first classifier layer is a 1×1 conv over the concatenation of the four stages upsampled to 1/4.
    A 1×1 conv over a concatenation is the sum of one 1×1 conv per part, and it commutes with bilinear
    upsampling, so each stage is projected at its own resolution and the projections are upsampled and
    summed: the same function, without a 1/4-resolution tensor of all backbone channels.
    """

    stages = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes: int, in_channels: int, *, backbone: str = "resnet50", width: float = 1.0,
                 aux: bool = False) -> None:
        super().__init__(num_classes, in_channels, aux_names=("aux",) if aux else (),
                         default_loss_weights={"out": 1.0, "aux": 0.4} if aux else {"out": 1.0})
        self.backbone = build_resnet(backbone, in_channels=in_channels, width=width, output_stride=32)
        hidden = scaled(256, width)
        self.project = nn.ModuleDict({
            name: nn.Conv2d(self.backbone.channels[name], hidden, 1, bias=False) for name in self.stages
        })
        self.fuse = nn.Sequential(nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(hidden, num_classes, 1)
        self.aux_classifier = FCNHead(self.backbone.channels["layer3"], num_classes) if aux else None

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        features = self.backbone(x)
        quarter = features["layer1"].shape[-2:]
        hidden = self.project["layer1"](features["layer1"])
        for name in self.stages[1:]:
            hidden = hidden + resize(self.project[name](features[name]), quarter)
        logits = self.classifier(self.fuse(hidden))
        return self.outputs(logits, x.shape[-2:], _aux_on_layer3(self.aux_classifier, features))
