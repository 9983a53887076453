"""Every registered model keeps the SegmentationModel contract (eval/train outputs, gradients, recorded
construction), and the registry's error messages."""

from __future__ import annotations

import pytest
import torch

from models import ModelError, SegmentationModel, build_model, list_models, model_options


def tiny_options(name: str) -> dict[str, object]:
    """The cheapest settings of model ``name`` that still exercise all of its parts."""
    valid = model_options(name)
    options: dict[str, object] = {"width": 0.125}
    if "backbone" in valid:
        options["backbone"] = "resnet18"
    if "aux" in valid:
        options["aux"] = True
    return options


@pytest.fixture(scope="module", params=[(name, channels) for name in list_models() for channels in (1, 3)],
                ids=lambda p: f"{p[0]}-c{p[1]}")
def tiny_model(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, int]:
    name, channels = request.param
    torch.manual_seed(0)
    return build_model(name, num_classes=3, in_channels=channels, **tiny_options(name)), channels


def test_registry_lists_the_contracted_models() -> None:
    assert set(list_models()) >= {"icnet", "fcn32s", "fcn16s", "fcn8s", "fcn_resnet18", "fcn_resnet50",
                                  "fcn_resnet101", "fcn_multiscale"}


@pytest.mark.parametrize("size", [(64, 64), (70, 90), (32, 32)])
def test_eval_output_has_input_size(tiny_model: tuple[torch.nn.Module, int], size: tuple[int, int]) -> None:
    model, channels = tiny_model
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, channels, *size))
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 3, *size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_train_outputs_and_gradients(tiny_model: tuple[torch.nn.Module, int], size: tuple[int, int]) -> None:
    model, channels = tiny_model
    model.train()
    outputs = model(torch.randn(2, channels, *size))
    assert isinstance(outputs, dict) and set(outputs) == {"out", *model.aux_names}
    assert outputs["out"].shape == (2, 3, *size)
    assert all(output.shape[:2] == (2, 3) for output in outputs.values())
    assert set(model.default_loss_weights) <= set(outputs)
    assert all(torch.isfinite(output).all() for output in outputs.values())
    loss = sum(weight * outputs[name].square().mean() for name, weight in model.default_loss_weights.items())
    model.zero_grad()
    loss.backward()
    first_conv = model.backbone.get_parameter(f"{model.backbone.first_conv}.weight")
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_every_model_records_its_construction() -> None:
    for name in list_models():
        with torch.device("meta"):
            model = build_model(name, num_classes=4, in_channels=1, **tiny_options(name))
        assert isinstance(model, SegmentationModel)
        assert (model.num_classes, model.in_channels) == (4, 1)
        assert model.default_loss_weights


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ModelError) as error:
        build_model("unet", num_classes=2)
    assert "icnet" in str(error.value) and "fcn8s" in str(error.value)


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ModelError) as error:
        build_model("icnet", num_classes=2, depth=3)
    assert "depth" in str(error.value) and "backbone" in str(error.value) and "width" in str(error.value)


@pytest.mark.parametrize("options", [{"backbone": "resnet9"}, {"width": 0}, {"num_classes": 0},
                                     {"in_channels": 2.5}])
def test_invalid_option_values(options: dict[str, object]) -> None:
    with pytest.raises(ModelError):
        build_model("icnet", **{"num_classes": 2, **options})


def test_fcn_loss_weights_follow_the_aux_head() -> None:
    with torch.device("meta"):
        assert build_model("fcn_resnet18", width=0.125).default_loss_weights == {"out": 1.0}
        assert build_model("fcn_resnet18", width=0.125, aux=True).default_loss_weights == {"out": 1.0, "aux": 0.4}
        assert build_model("icnet").default_loss_weights == {"sub16": 0.4, "sub8": 0.4, "sub4": 1.0}
