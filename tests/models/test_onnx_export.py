"""ONNX parity at odd sizes and batches, for a tiny ICNet and the shipped model; the tolerance catches real
export faults; bilinear resizing, the one operator that cannot agree exactly, differs only as explained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import models.icnet
from models import build_model, load_checkpoint
from models.heads import half_size, resize
from models.onnx_export import ExportError, check_parity, cpu_session, export_onnx
from tests.conftest import REPO_ROOT

# Odd sides (not multiples of the 32-pixel stride; 97×33 leaves the pyramid pooling a 4×2 map for its 6×6
# cells), a 2-megapixel frame, and batches of two.
SWEEP = [pytest.param((203, 317), 2, id="203x317-n2"), pytest.param((97, 33), 2, id="97x33-n2"),
         pytest.param((1440, 1920), 2, id="1440x1920-n2")]


@pytest.fixture(scope="module")
def tiny_icnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """The cheapest ICNet that has every part (ResNet-18, width 0.125), exported once."""
    torch.manual_seed(0)
    model = build_model("icnet", num_classes=3, in_channels=1, backbone="resnet18", width=0.125)
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx") / "icnet.onnx", in_channels=1)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model, meta = load_checkpoint(REPO_ROOT / "weights" / "icnet_interferogram.pt")
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx") / "shipped.onnx", in_channels=meta.in_channels)


@pytest.mark.parametrize(("size", "batch"), SWEEP)
def test_tiny_icnet_matches_pytorch_to_1e_4(tiny_icnet: tuple[nn.Module, Path], size: tuple[int, int],
                                            batch: int) -> None:
    model, path = tiny_icnet
    [result] = check_parity(model, path, sizes=[size], batch=batch)
    assert result.max_abs_diff <= 1e-4 and result.ok


@pytest.mark.parametrize(("size", "batch"), [*SWEEP, pytest.param((1441, 1919), 1, id="1441x1919-n1")])
def test_shipped_model_matches_pytorch_within_the_stated_tolerance(shipped: tuple[nn.Module, Path],
                                                                   size: tuple[int, int], batch: int) -> None:
    model, path = shipped
    [result] = check_parity(model, path, sizes=[size], batch=batch)
    assert result.logit_scale > 2  # trained logits, several times the 1e-4 floor's unit scale
    assert result.ok, result


def _align_corners_resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    return F.interpolate(x, size=(size[0], size[1]), mode="bilinear", align_corners=True)


def test_a_real_export_fault_fails_the_tolerance(shipped: tuple[nn.Module, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An exported graph that resizes with align_corners=True (the classic mismatch) must not pass."""
    model, _ = shipped
    with monkeypatch.context() as patch:
        patch.setattr(models.icnet, "resize", _align_corners_resize)
        faulty = export_onnx(model, tmp_path / "faulty.onnx", in_channels=3)
    [result] = check_parity(model, faulty, sizes=[(203, 317)])
    assert not result.ok and result.max_abs_diff > 10 * result.tolerance


class _FrozenSize(nn.Module):
    """Resizes to the size seen while tracing: int() turns the traced size into a constant."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=(int(x.shape[-2]), int(x.shape[-1])), mode="bilinear", align_corners=False)


def test_a_graph_that_returns_another_size_is_an_export_error(tmp_path: Path) -> None:
    path = export_onnx(_FrozenSize(), tmp_path / "frozen.onnx", in_channels=1, sample_hw=(64, 64))
    with pytest.raises(ExportError, match="70×90"):
        check_parity(_FrozenSize(), path, sizes=[(70, 90)])


class _Halve(nn.Module):
    """ICNet's first operator: the frame bilinearly resized to half its size, rounded up."""

    def forward(self, x: Tensor) -> Tensor:
        return resize(x, half_size(x))


@pytest.mark.parametrize("size", [(1441, 1919), (203, 317), (1440, 1920)])
def test_bilinear_resize_differs_only_by_sample_point_rounding(size: tuple[int, int], tmp_path: Path) -> None:
    """Where in/out is not a power of two, ONNX Runtime and PyTorch round the sample points differently
    (a few float32 ulps of the coordinate, up to ~2^-22·side pixels), which moves each output by at most that
    times the largest step between neighbouring inputs; where it is, they agree to float noise."""
    path = export_onnx(_Halve(), tmp_path / "halve.onnx", in_channels=1)
    x = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(0))
    from_onnx = cpu_session(path).run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        from_torch = _Halve()(x).numpy()
    difference = np.abs(from_onnx - from_torch).max()
    if all(side % 2 == 0 for side in size):
        assert difference <= 1e-6
    else:
        steepest = max(np.abs(np.diff(x.numpy(), axis=axis)).max() for axis in (-2, -1))
        assert difference <= 2.0**-21 * max(size) * steepest
