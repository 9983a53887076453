"""ICNet (Zhao et al., "ICNet for Real-Time Semantic Segmentation on High-Resolution Images", ECCV 2018).

The original design, which shares the backbone between the low and medium resolutions (a popular port
instead runs the whole backbone on two image scales and costs about five times more):

* low resolution: the 1/2 image runs through the ResNet stem, layer1 and the first block of layer2
  (conv3_1), giving a 1/16 map; that map is bilinearly halved to 1/32 and continues through the rest of
  layer2, layer3 and layer4 (dilations 2 and 4, no further striding), then parameter-free pyramid pooling
  (bins 1, 2, 3, 6, summed) and a 1×1 conv-BN-ReLU reduction (conv5_4_k1);
* medium resolution: the conv3_1 map at 1/16, i.e. the same computation, feeds CFF(1/32, 1/16);
* high resolution: three 3×3 stride-2 conv-BN-ReLU on the full image -> 1/8, feeding CFF(1/16, 1/8);
* the fused 1/8 map is upsampled ×2 and classified (1×1) at 1/4 ("sub4"), then upsampled to the input.

Channel counts at ``width=0.5`` are those of the released (compressed) Cityscapes model: half-width
ResNet-50, conv5_4_k1 256, CFF outputs 128, high-resolution branch 32/32/64. ``width=1.0`` doubles all
of them (the uncompressed network the paper prunes).
"""

from __future__ import annotations

from torch import Tensor, nn

from models.backbones import build_resnet, scaled
from models.base import SegmentationModel
from models.heads import CascadeFeatureFusion, ConvBNReLU, PyramidPoolingSum, half_size, resize

# Channel counts at width 1.0 (see the module docstring).
HIGH_RES_CHANNELS = (64, 64, 128)
REDUCED_CHANNELS = 512
FUSED_CHANNELS = 256


class ICNet(SegmentationModel):
    """Image cascade network. N×in_channels×H×W (H, W ≥ 32) -> N×num_classes×H×W logits in eval mode.

    In training mode returns {"out": N×K×H×W, "sub4": 1/4, "sub8": 1/8, "sub16": 1/16 logits}, the inputs
    of the cascade label guidance loss (weights in ``default_loss_weights``).
    """

    def __init__(self, num_classes: int, in_channels: int, *, backbone: str = "resnet50",
                 width: float = 0.5) -> None:
        super().__init__(num_classes, in_channels, aux_names=("sub4", "sub8", "sub16"),
                         default_loss_weights={"sub16": 0.4, "sub8": 0.4, "sub4": 1.0})
        # Output stride 8 gives layer3/layer4 dilations 2/4 and no stride after layer2, as ICNet needs.
        self.backbone = build_resnet(backbone, in_channels=in_channels, width=width, output_stride=8)
        backbone_channels = self.backbone.channels
        reduced = scaled(REDUCED_CHANNELS, width)
        fused = scaled(FUSED_CHANNELS, width)
        c1, c2, c3 = (scaled(c, width) for c in HIGH_RES_CHANNELS)
        self.pyramid = PyramidPoolingSum((1, 2, 3, 6))
        self.reduce = ConvBNReLU(backbone_channels["layer4"], reduced, kernel_size=1)
        self.high_res = nn.Sequential(
            ConvBNReLU(in_channels, c1, stride=2),
            ConvBNReLU(c1, c2, stride=2),
            ConvBNReLU(c2, c3, stride=2),
        )
        self.cff_low = CascadeFeatureFusion(reduced, backbone_channels["layer2"], fused, num_classes)
        self.cff_high = CascadeFeatureFusion(fused, c3, fused, num_classes)
        self.classifier = nn.Conv2d(fused, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        backbone = self.backbone
        half = resize(x, half_size(x))
        layer2_blocks = list(backbone.layer2)
        medium = layer2_blocks[0](backbone.layer1(backbone.forward_stem(half)))  # conv3_1, 1/16
        low = resize(medium, half_size(medium))  # 1/32
        for block in layer2_blocks[1:]:
            low = block(low)
        low = self.reduce(self.pyramid(backbone.layer4(backbone.layer3(low))))
        high = self.high_res(x)  # 1/8
        fused16, aux16 = self.cff_low(low, medium)
        fused8, aux8 = self.cff_high(fused16, high)
        sub4 = self.classifier(resize(fused8, (2 * fused8.shape[-2], 2 * fused8.shape[-1])))
        return self.outputs(sub4, x.shape[-2:], lambda: {"sub4": sub4, "sub8": aux8, "sub16": aux16})
