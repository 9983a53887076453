"""ICNet: the paper's cost budget, the shared-backbone cascade, CFF and pyramid pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.flops import count_gflops, count_params
from models.heads import CascadeFeatureFusion, PyramidPoolingSum, average_pool_matrix


def test_paper_configuration_fits_the_budget() -> None:
    model = build_model("icnet", num_classes=19, backbone="resnet50", width=0.5, in_channels=3)
    assert count_params(model) <= 8e6
    assert count_gflops(model, (1, 3, 1024, 1024)) <= 35


def test_width_halves_every_backbone_stage() -> None:
    with torch.device("meta"):
        half = build_model("icnet", backbone="resnet50", width=0.5).backbone.channels
        full = build_model("icnet", backbone="resnet50", width=1.0).backbone.channels
    assert all(half[name] * 2 == full[name] for name in full)
    assert full["layer4"] == 2048


def test_backbone_runs_once_per_frame() -> None:
    """The original shares conv1..conv3_1 between the 1/32 and 1/16 branches: every stage runs once."""
    model = build_model("icnet", num_classes=2, backbone="resnet18", width=0.125).eval()
    calls: dict[str, int] = {}
    for name in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        module = model.backbone.get_submodule(name)
        module.register_forward_hook(lambda *_, key=name: calls.__setitem__(key, calls.get(key, 0) + 1))
    blocks = list(model.backbone.layer2)
    seen: list[tuple[int, ...]] = []
    blocks[0].register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[-2:])))
    blocks[1].register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[-2:])))
    with torch.no_grad():
        model(torch.randn(1, 1, 128, 192))
    assert calls == {"conv1": 1, "layer1": 1, "layer3": 1, "layer4": 1}  # layer2 is entered block by block
    assert seen == [(8, 12), (4, 6)]  # conv3_1 at 1/16, the rest of layer2 after halving to 1/32


@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_training_outputs_have_cascade_resolutions(size: tuple[int, int]) -> None:
    model = build_model("icnet", num_classes=3, backbone="resnet18", width=0.125).train()
    outputs = model(torch.randn(2, 1, *size))
    height, width = size
    eighth = ((height + 7) // 8, (width + 7) // 8)
    assert outputs["out"].shape == (2, 3, *size)
    assert outputs["sub8"].shape[-2:] == eighth
    assert outputs["sub4"].shape[-2:] == (2 * eighth[0], 2 * eighth[1])
    assert outputs["sub16"].shape[-2:] == ((height + 15) // 16, (width + 15) // 16)


def test_cff_shapes_and_aux_only_in_training() -> None:
    cff = CascadeFeatureFusion(low_channels=16, high_channels=8, out_channels=12, num_classes=5)
    low, high = torch.randn(2, 16, 5, 6), torch.randn(2, 8, 9, 12)
    fused, aux = cff.train()(low, high)
    assert fused.shape == (2, 12, 9, 12)
    assert aux is not None and aux.shape == (2, 5, 9, 12)
    assert (fused >= 0).all()  # ReLU after the sum
    fused_eval, aux_eval = cff.eval()(low, high)
    assert fused_eval.shape == (2, 12, 9, 12) and aux_eval is None


@pytest.mark.parametrize("size", [(6, 6), (7, 11), (3, 5), (1, 1)])
def test_pyramid_pooling_matches_adaptive_average_pooling(size: tuple[int, int]) -> None:
    x = torch.randn(2, 4, *size)
    expected = x.clone()
    for bins in (1, 2, 3, 6):
        pooled = F.adaptive_avg_pool2d(x, bins)
        expected += F.interpolate(pooled, size=size, mode="bilinear", align_corners=False)
        rows, cols = average_pool_matrix(size[0], bins, x), average_pool_matrix(size[1], bins, x)
        torch.testing.assert_close(rows @ x @ cols.T, pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(PyramidPoolingSum((1, 2, 3, 6))(x), expected, rtol=1e-5, atol=1e-5)
