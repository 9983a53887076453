"""FCN family: bilinear deconvolution, skip fusion, ResNet heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.heads import BilinearUpsample


@pytest.mark.parametrize("factor", [2, 8, 32])
def test_bilinear_deconv_equals_interpolation_away_from_borders(factor: int) -> None:
    upsample = BilinearUpsample(3, factor)
    x = torch.randn(1, 3, 5, 7)
    with torch.no_grad():
        up = upsample(x)
    expected = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert up.shape == expected.shape
    inner = (slice(None), slice(None), slice(factor, -factor), slice(factor, -factor))
    torch.testing.assert_close(up[inner], expected[inner], rtol=1e-5, atol=1e-5)


def test_fcn32s_upsampling_keeps_a_constant_map() -> None:
    model = build_model("fcn32s", num_classes=2, in_channels=1, width=0.125)
    constant = torch.full((1, 2, 4, 5), 3.0)
    with torch.no_grad():
        up = model.upscore(constant)
    assert up.shape == (1, 2, 128, 160)
    torch.testing.assert_close(up[:, :, 32:-32, 32:-32], torch.full((1, 2, 64, 96), 3.0))


def test_resnet_fcn_has_output_stride_8_and_aux_on_layer3() -> None:
    model = build_model("fcn_resnet18", num_classes=2, in_channels=3, width=0.125, aux=True).train()
    features = model.backbone(torch.randn(2, 3, 64, 64))
    assert features["layer4"].shape[-2:] == (8, 8)
    assert model(torch.randn(2, 3, 64, 64))["aux"].shape == (2, 2, 8, 8)


def test_multiscale_fcn_uses_every_stage() -> None:
    model = build_model("fcn_multiscale", num_classes=2, in_channels=1, backbone="resnet18", width=0.125).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        before = model(x)
        for name in model.stages:
            weight = model.project[name].weight
            saved = weight.clone()
            weight.zero_()
            assert not torch.allclose(model(x), before), f"{name} does not reach the classifier"
            weight.copy_(saved)
