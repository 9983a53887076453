"""SegmentationModel: the auxiliary heads run in training only, and the shipped weights still fit."""

from __future__ import annotations

import pytest
import torch

from models import build_model, load_checkpoint
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize(("name", "options", "aux_heads"), [
    ("icnet", {"backbone": "resnet18"}, ("cff_low.classifier", "cff_high.classifier")),
    ("fcn_resnet18", {"aux": True}, ("aux_classifier",)),
    ("fcn_multiscale", {"backbone": "resnet18", "aux": True}, ("aux_classifier",)),
])
def test_auxiliary_heads_run_in_training_only(name: str, options: dict[str, object],
                                              aux_heads: tuple[str, ...]) -> None:
    model = build_model(name, num_classes=2, in_channels=1, width=0.125, **options)
    calls: list[str] = []
    for head in aux_heads:
        model.get_submodule(head).register_forward_hook(lambda *_, head=head: calls.append(head))
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        model.eval()(x)
        assert calls == []
        model.train()(x)
    assert sorted(calls) == sorted(aux_heads)


def test_shipped_checkpoint_loads_into_the_same_parameter_names() -> None:
    model, meta = load_checkpoint(REPO_ROOT / "weights" / "icnet_interferogram.pt")
    state = torch.load(REPO_ROOT / "weights" / "icnet_interferogram.pt", map_location="cpu",
                       weights_only=True)["state_dict"]
    assert list(model.state_dict()) == list(state)
    assert model.aux_names == ("sub4", "sub8", "sub16") and model.in_channels == meta.in_channels == 3
