"""The explicit model registry: name -> builder, and :func:`build_model` with option checking.

Every builder takes ``num_classes`` and ``in_channels`` (1 = grayscale interferograms, 3 = RGB) plus its
own keyword options; the mapping is read-only, so entries are never mutated or added at runtime.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import MappingProxyType

from models.backbones import RESNET_NAMES
from models.base import SegmentationModel
from models.errors import ModelError
from models.fcn import FCNVGG, FCNMultiScale, FCNResNet
from models.icnet import ICNet


def _icnet(*, num_classes: int, in_channels: int, backbone: str = "resnet50",
           width: float = 0.5) -> SegmentationModel:
    return ICNet(num_classes, in_channels, backbone=backbone, width=width)


def _fcn32s(*, num_classes: int, in_channels: int, width: float = 1.0) -> SegmentationModel:
    return FCNVGG(num_classes, in_channels, stride=32, width=width)


def _fcn16s(*, num_classes: int, in_channels: int, width: float = 1.0) -> SegmentationModel:
    return FCNVGG(num_classes, in_channels, stride=16, width=width)


def _fcn8s(*, num_classes: int, in_channels: int, width: float = 1.0) -> SegmentationModel:
    return FCNVGG(num_classes, in_channels, stride=8, width=width)


def _fcn_resnet18(*, num_classes: int, in_channels: int, width: float = 1.0,
                  aux: bool = False) -> SegmentationModel:
    return FCNResNet(num_classes, in_channels, backbone="resnet18", width=width, aux=aux)


def _fcn_resnet50(*, num_classes: int, in_channels: int, width: float = 1.0,
                  aux: bool = False) -> SegmentationModel:
    return FCNResNet(num_classes, in_channels, backbone="resnet50", width=width, aux=aux)


def _fcn_resnet101(*, num_classes: int, in_channels: int, width: float = 1.0,
                   aux: bool = False) -> SegmentationModel:
    return FCNResNet(num_classes, in_channels, backbone="resnet101", width=width, aux=aux)


def _fcn_multiscale(*, num_classes: int, in_channels: int, backbone: str = "resnet50", width: float = 1.0,
                    aux: bool = False) -> SegmentationModel:
    return FCNMultiScale(num_classes, in_channels, backbone=backbone, width=width, aux=aux)


MODELS: MappingProxyType[str, Callable[..., SegmentationModel]] = MappingProxyType({
    "icnet": _icnet,
    "fcn32s": _fcn32s,
    "fcn16s": _fcn16s,
    "fcn8s": _fcn8s,
    "fcn_resnet18": _fcn_resnet18,
    "fcn_resnet50": _fcn_resnet50,
    "fcn_resnet101": _fcn_resnet101,
    "fcn_multiscale": _fcn_multiscale,
})


def list_models() -> list[str]:
    """Registered model names, in registration order."""
    return list(MODELS)


def model_options(name: str) -> dict[str, object]:
    """The keyword options of model ``name`` (besides num_classes/in_channels) and their defaults."""
    if name not in MODELS:
        raise ModelError(f"unknown model '{name}'; valid models: {', '.join(MODELS)}")
    parameters = inspect.signature(MODELS[name]).parameters
    return {key: p.default for key, p in parameters.items() if key not in ("num_classes", "in_channels")}


def _check_count(label: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelError(f"{label} must be a positive integer, got {value!r}")


def build_model(name: str, num_classes: int = 2, in_channels: int = 1,
                **options: object) -> SegmentationModel:
    """Build registered model ``name`` (in training mode, freshly initialised).

    Unknown name or option, or an invalid value (e.g. an unknown ``backbone``) -> :class:`ModelError`
    naming the valid choices. The model has ``num_classes``, ``in_channels`` and
    ``default_loss_weights`` attributes and a ``backbone`` submodule.
    """
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(f"{key}={default!r}" for key, default in valid.items()) or "none"
        raise ModelError(f"model '{name}' has no option {', '.join(unknown)}; valid options: {listed}")
    _check_count("num_classes", num_classes)
    _check_count("in_channels", in_channels)
    if "backbone" in options and options["backbone"] not in RESNET_NAMES:
        raise ModelError(f"unknown backbone {options['backbone']!r}; valid backbones: {', '.join(RESNET_NAMES)}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **options)
