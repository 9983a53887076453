"""Building blocks shared by the segmentation models: resizing, conv-BN-ReLU, heads, pooling, fusion.

Everything here exports to ONNX with dynamic height and width: resizes take an explicit ``size`` (never
``scale_factor``, whose rounding differs between PyTorch and ONNX Runtime) with ``align_corners=False``,
and pyramid pooling is written as two small matrix products instead of ``adaptive_avg_pool2d`` (which the
exporter cannot handle when the input size is not known in advance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize of N×C×h×w to N×C×size (align_corners=False, the convention used everywhere here)."""
    # No int(): while tracing for ONNX the sizes are tensors, and int() would freeze them into constants.
    return F.interpolate(x, size=(size[0], size[1]), mode="bilinear", align_corners=False)


def half_size(x: Tensor) -> tuple[int, int]:
    """(ceil(H/2), ceil(W/2)) of an N×C×H×W tensor: the size after one stride-2 step."""
    return (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2


class ConvBNReLU(nn.Sequential):
    """k×k conv (no bias) -> BatchNorm -> ReLU; padding keeps the size at stride 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=dilation * (kernel_size // 2), dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class FCNHead(nn.Sequential):
    """torchvision's FCN head: 3×3 conv to C/4, BN, ReLU, dropout 0.1, 1×1 conv. N×C×h×w -> N×K×h×w.

    Same layer indices as ``torchvision.models.segmentation.fcn.FCNHead``, so its checkpoints fit.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        hidden = max(1, in_channels // 4)
        super().__init__(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(hidden, num_classes, 1),
        )


def average_pool_matrix(length: Tensor | int, bins: int, like: Tensor) -> Tensor:
    """bins×length matrix whose rows average the cells of adaptive average pooling along one axis.

    Row i averages positions floor(i·L/bins) .. ceil((i+1)·L/bins)-1, exactly the regions of
    ``adaptive_avg_pool2d``; built from ``length`` with tensor ops so a traced graph keeps L dynamic.
    """
    device = like.device
    index = torch.arange(bins, device=device)
    start = torch.div(index * length, bins, rounding_mode="floor")
    end = torch.div((index + 1) * length + bins - 1, bins, rounding_mode="floor")
    position = torch.arange(length, device=device)
    inside = ((position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])).to(like.dtype)
    return inside / inside.sum(dim=1, keepdim=True)


class PyramidPoolingSum(nn.Module):
    """ICNet's parameter-free pyramid pooling: average-pool to b×b for each bin b, upsample, and SUM with
    the input (PSPNet concatenates; ICNet sums to stay cheap). N×C×h×w -> N×C×h×w; any h, w ≥ 1."""

    def __init__(self, bins: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.bins = bins

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2], x.shape[-1]
        out = x
        for bins in self.bins:
            rows = average_pool_matrix(height, bins, x)
            cols = average_pool_matrix(width, bins, x)
            pooled = rows @ x @ cols.transpose(0, 1)
            out = out + resize(pooled, (height, width))
        return out


class CascadeFeatureFusion(nn.Module):
    """ICNet's cascade feature fusion (CFF) of a low-resolution and a ×2 higher-resolution feature map.

    low (N×C_low×h×w) is upsampled to the size of high (N×C_high×H×W, H≈2h) -> 3×3 conv dilation 2 -> BN;
    high -> 1×1 conv -> BN; sum -> ReLU gives N×out_channels×H×W. In training the auxiliary 1×1
    classifier on the upsampled low input also returns N×K×H×W logits (cascade label guidance), else None.
    """

    def __init__(self, low_channels: int, high_channels: int, out_channels: int, num_classes: int) -> None:
        super().__init__()
        self.low = nn.Sequential(
            nn.Conv2d(low_channels, out_channels, 3, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.high = nn.Sequential(nn.Conv2d(high_channels, out_channels, 1, bias=False),
                                  nn.BatchNorm2d(out_channels))
        self.classifier = nn.Conv2d(low_channels, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor | None]:
        low_up = resize(low, high.shape[-2:])
        fused = F.relu(self.low(low_up) + self.high(high), inplace=True)
        return fused, self.classifier(low_up) if self.training else None


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """channels×channels×k×k ConvTranspose2d weight that performs bilinear upsampling per channel."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(kernel_size, dtype=torch.float32) - center).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = ramp[:, None] * ramp[None, :]
    return weight


class BilinearUpsample(nn.ConvTranspose2d):
    """Learnable ×factor upsampling initialised to bilinear interpolation (FCN's "deconvolution").

    N×C×h×w -> N×C×(factor·h)×(factor·w). Kernel 2·factor with padding factor/2 puts input pixel centres
    where ``F.interpolate(..., align_corners=False)`` puts them, so the two agree away from the borders.
    """

    def __init__(self, channels: int, factor: int) -> None:
        if factor % 2:
            raise ValueError(f"upsampling factor must be even, got {factor}")
        super().__init__(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
        with torch.no_grad():
            self.weight.copy_(bilinear_kernel(channels, 2 * factor))


def crop_to(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Keep the top-left size[0]×size[1] of N×C×H×W (H, W ≥ size); alignment is exact, see BilinearUpsample."""
    return x[:, :, : size[0], : size[1]]

