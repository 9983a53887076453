"""Checkpoints that carry their own recipe: one file with the weights and everything needed to use them.

File layout (``torch.save`` of a dict, loadable with ``weights_only=True``)::

    {"format": "cellseg-checkpoint", "version": 1, "state_dict": {...}, "meta": CheckpointMeta.to_dict()}

``--weights FILE`` alone is enough to run a model: the architecture and its options rebuild the network,
and class names, palette, input size and normalisation drive preprocessing and display.
"""

from __future__ import annotations

import colorsys
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.errors import first_line
from app.files import atomic_path
from models.errors import CheckpointError, ModelError
from models.registry import build_model

FORMAT = "cellseg-checkpoint"
VERSION = 1
NORMALIZATION_MODES = ("standardize", "mean_std", "none")
# torch.load's weights-only refusal is a page of advice; the actual reason follows this marker.
_WEIGHTS_ONLY_REASON = "WeightsUnpickler error:"

# Background black, then colours that stay apart on gray microscopy frames.
_BASE_PALETTE = ((0, 0, 0), (0, 220, 0), (230, 25, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
                 (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                 (0, 128, 128), (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0))


CONTACT_CLASS = "contact"
"""Name of a last class that marks the seams between touching objects (``train.contact_px``)."""


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """RGB 0-255 colour per class: black background, then fixed distinct colours, then golden-ratio hues."""
    colours = list(_BASE_PALETTE[:num_classes])
    for index in range(len(colours), num_classes):
        hue = (index * 0.618033988749895) % 1.0
        red, green, blue = colorsys.hsv_to_rgb(hue, 0.8, 0.95)
        colours.append((round(red * 255), round(green * 255), round(blue * 255)))
    return tuple(colours)


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint records besides the weights.

    ``options`` are the full :func:`build_model` keyword arguments (including num_classes and in_channels);
    ``palette`` is RGB 0-255 per class; ``input_size`` is (H, W) of training; ``normalization`` is
    ``{"mode": "standardize"}`` (per image zero mean, unit variance) or ``{"mode": "mean_std", "mean": [...],
    "std": [...]}`` applied to input scaled to 0..1.
    """

    arch: str
    options: dict[str, Any]
    num_classes: int
    in_channels: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    input_size: tuple[int, int]
    normalization: dict[str, Any]
    train_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def contact_class(self) -> int | None:
        """The id of the class of seams between touching objects: the last class when it is named
        :data:`CONTACT_CLASS` and follows background and at least one object class; else None."""
        names = self.class_names
        return len(names) - 1 if len(names) >= 3 and names[-1] == CONTACT_CLASS else None

    @property
    def label_names(self) -> tuple[str, ...]:
        """The classes of the label maps the pipeline hands on: all but a contact class, whose pixels
        go to class 1 (see :mod:`app.pipeline.inference`)."""
        contact = self.contact_class
        return self.class_names if contact is None else self.class_names[:contact]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable copy (tuples become lists)."""
        return _plain({
            "arch": self.arch, "options": self.options, "num_classes": self.num_classes,
            "in_channels": self.in_channels, "class_names": self.class_names, "palette": self.palette,
            "input_size": self.input_size, "normalization": self.normalization,
            "train_config": self.train_config, "metrics": self.metrics, "extra": self.extra,
        }, "meta")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        """Inverse of :meth:`to_dict`; raises KeyError/TypeError/ValueError on malformed input."""
        return cls(
            arch=str(data["arch"]),
            options=dict(data["options"]),
            num_classes=int(data["num_classes"]),
            in_channels=int(data["in_channels"]),
            class_names=tuple(str(name) for name in data["class_names"]),
            palette=tuple((int(r), int(g), int(b)) for r, g, b in data["palette"]),
            input_size=(int(data["input_size"][0]), int(data["input_size"][1])),
            normalization=dict(data["normalization"]),
            train_config=dict(data.get("train_config") or {}),
            metrics=dict(data.get("metrics") or {}),
            extra=dict(data.get("extra") or {}),
        )


def _plain(value: Any, where: str) -> Any:
    """Convert to str/int/float/bool/None/list/dict so the file loads with ``weights_only=True``."""
    if value is None or type(value) in (str, bool, int, float):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(key): _plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy / torch scalars
        return value.item()
    for base in (bool, int, float, str):  # subclasses (e.g. IntEnum) would pickle as their own class
        if isinstance(value, base):
            return base(value)
    raise CheckpointError(f"cannot store {where} of type {type(value).__name__} in a checkpoint")


def _check_normalization(normalization: dict[str, Any], in_channels: int) -> None:
    mode = normalization.get("mode")
    if mode not in NORMALIZATION_MODES:
        raise CheckpointError(f"normalization mode must be one of {', '.join(NORMALIZATION_MODES)}, got {mode!r}")
    if mode == "mean_std":
        for key in ("mean", "std"):
            values = normalization.get(key)
            if not isinstance(values, (list, tuple)) or len(values) != in_channels:
                raise CheckpointError(f"normalization '{key}' needs {in_channels} values, got {values!r}")
        if any(not math.isfinite(s) or s <= 0 for s in normalization["std"]):
            raise CheckpointError(f"normalization std must be positive, got {normalization['std']!r}")


def save_checkpoint(path: str | Path, model: nn.Module, *, arch: str, options: dict[str, Any],
                    class_names: list[str] | tuple[str, ...],
                    palette: list[tuple[int, int, int]] | tuple[tuple[int, int, int], ...] | None,
                    input_size: int | tuple[int, int], normalization: dict[str, Any],
                    train_config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> CheckpointMeta:
    """Write ``model`` and its recipe to ``path`` atomically (temporary file, then rename); returns the meta.

    ``options`` are the build_model options; num_classes and in_channels are taken from the model. The
    options are checked against the model (same parameter names and shapes), so the file always loads.
    ``palette`` None -> :func:`default_palette`.
    """
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    num_classes, in_channels = int(model.num_classes), int(model.in_channels)
    full_options = {**options, "num_classes": num_classes, "in_channels": in_channels}
    for key in ("num_classes", "in_channels"):
        if key in options and options[key] != full_options[key]:
            raise CheckpointError(f"options say {key}={options[key]!r} but the model has {full_options[key]}")
    if len(class_names) != num_classes:
        raise CheckpointError(f"{len(class_names)} class names for a model with {num_classes} classes")
    palette = default_palette(num_classes) if palette is None else palette
    if len(palette) != num_classes:
        raise CheckpointError(f"{len(palette)} palette colours for a model with {num_classes} classes")
    _check_normalization(normalization, in_channels)
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    state_dict = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    try:
        with torch.device("meta"):  # builds without allocating or initialising weights
            reference = build_model(arch, **full_options).state_dict()
    except ModelError as exc:
        raise CheckpointError(f"arch/options do not describe a model: {exc}") from None
    mismatched = [key for key in reference.keys() | state_dict.keys()
                  if key not in reference or key not in state_dict or reference[key].shape != state_dict[key].shape]
    if mismatched:
        raise CheckpointError(f"model does not match arch '{arch}' with options {full_options} "
                              f"(e.g. {sorted(mismatched)[0]})")
    meta = CheckpointMeta.from_dict({
        "arch": arch, "options": full_options, "num_classes": num_classes, "in_channels": in_channels,
        "class_names": list(class_names), "palette": list(palette), "input_size": size,
        "normalization": normalization, "train_config": train_config or {}, "metrics": metrics or {},
        "extra": extra or {},
    })
    atomic_save({"format": FORMAT, "version": VERSION, "state_dict": state_dict, "meta": meta.to_dict()}, path)
    return meta


def atomic_save(payload: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary name beside ``path``, then rename: a reader (or a crash mid-write)
    never sees a half-written file."""
    with atomic_path(path) as partial:
        torch.save(payload, partial)


def _gist(exc: BaseException) -> str:
    """The gist of an exception message: its first line, plus the next one when the first is only a header
    ("Error(s) in loading state_dict for ICNet:"); for torch.load's weights-only refusal, the reason itself
    (e.g. "Unsupported global: GLOBAL models.fcn.FCNResNet" for a whole pickled model)."""
    text = str(exc).strip()
    if _WEIGHTS_ONLY_REASON in text:
        return first_line(text.split(_WEIGHTS_ONLY_REASON, 1)[1]).split(" was not an allowed")[0] or first_line(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines and lines[0].endswith(":") else first_line(exc)


def check_checkpoint_path(path: Path) -> None:
    """Say what ``path`` is when it cannot be a checkpoint: missing, a folder, not a regular file (a device
    such as /dev/null, a FIFO), empty, or an ONNX graph (which runs with ``model.onnx_path``, not as weights)."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; --weights takes a checkpoint file (.pt) saved by training")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file; --weights takes a checkpoint file (.pt)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty, not a checkpoint")
    with path.open("rb") as handle:
        head = handle.read(64)
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"pytorch" in head.lower()):
        raise CheckpointError(f"{path} is an ONNX graph, not a checkpoint: pass the .pt checkpoint with --weights "
                              "and run the graph with --backend onnx --set model.onnx_path=" + str(path))


def load_checkpoint(path: str | Path, num_classes: int | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model stored at ``path`` (eval mode, on ``map_location``) and return it with its meta.

    Missing, truncated or corrupt file, a file that is not a checkpoint of this project (e.g. a plain
    state_dict), or ``num_classes`` given and different -> :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    check_checkpoint_path(path)
    try:
        with warnings.catch_warnings():
            # Foreign pickles make torch.load warn about their protocol; the error below says what matters.
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many types for corrupt files; the message is what matters
        raise CheckpointError(f"{path}: cannot read checkpoint: truncated, corrupt or not a {FORMAT} file "
                              f"({_gist(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            raise CheckpointError(f"{path}: a plain state_dict, not a {FORMAT} file (it records no architecture; "
                                  "save with models.save_checkpoint)")
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r} not supported "
                              f"(this code reads version {VERSION})")
    try:
        meta = CheckpointMeta.from_dict(payload["meta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed checkpoint metadata ({_gist(exc)})") from None
    if num_classes is not None and meta.num_classes != num_classes:
        raise CheckpointError(f"{path}: checkpoint has {meta.num_classes} classes ({', '.join(meta.class_names)}), "
                              f"expected {num_classes}")
    try:
        model = build_model(meta.arch, **meta.options)
        model.load_state_dict(payload["state_dict"])
    except (ModelError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit '{meta.arch}' ({_gist(exc)})") from None
    return model.to(map_location).eval(), meta
