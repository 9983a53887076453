"""What the benchmarks run on: the shipped model (or a labelled stand-in), backends and synthetic frames.

When ``model.weights`` is missing, an untrained network of the shipped recipe (ICNet, ResNet-18
backbone, width 0.5, 1 input channel, 2 classes) stands in: same architecture, so the same speed, but
its masks mean nothing, and every result says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from app.config import Config
    from app.pipeline.preprocess import Preprocessor
    from models import CheckpointMeta

SHIPPED_ARCH = "icnet"
SHIPPED_OPTIONS = {"backbone": "resnet18", "width": 0.5, "num_classes": 2, "in_channels": 1}


@dataclass
class LoadedModel:
    """A model in eval mode on the CPU with its recipe; ``trained`` is False for the stand-in."""

    model: nn.Module
    meta: CheckpointMeta
    label: str
    trained: bool
    weights: Path

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.weights), "found": self.trained, "arch": self.meta.arch,
                "options": self.meta.options, "label": self.label}


def load_model(config: Config) -> LoadedModel:
    """The checkpoint at ``config.model.weights``, or an untrained model of the shipped recipe."""
    from models import CheckpointMeta, build_model, default_palette, load_checkpoint

    weights = Path(config.model.weights)
    if weights.is_file():
        model, meta = load_checkpoint(weights)
        options = ", ".join(f"{k}={v}" for k, v in meta.options.items())
        return LoadedModel(model, meta, f"{weights} ({meta.arch}: {options})", True, weights)
    model = build_model(SHIPPED_ARCH, **SHIPPED_OPTIONS).eval()
    meta = CheckpointMeta(arch=SHIPPED_ARCH, options=dict(SHIPPED_OPTIONS), num_classes=2, in_channels=1,
                          class_names=("background", "cell"), palette=default_palette(2), input_size=(256, 256),
                          normalization={"mode": "standardize"})
    label = (f"UNTRAINED {SHIPPED_ARCH} resnet18 width 0.5 stand-in: {weights} not found "
             "(same architecture, so timings hold; its masks are meaningless)")
    return LoadedModel(model, meta, label, False, weights)


def make_backend(name: str, model: nn.Module, in_channels: int, config: Config, workdir: Path,
                 tag: str = "model", concurrent: bool = False) -> Any:
    """Backend ``name`` (a :data:`~app.pipeline.backends.BACKENDS` entry) for ``model``, made by the
    pipeline's own factory; ONNX graphs are exported into ``workdir``. ``concurrent`` picks the thread
    count the threaded pipeline uses, otherwise the count for inference running alone."""
    import dataclasses

    from app.pipeline.backends import create_backend

    settings = dataclasses.replace(config.model, backend=name)
    return create_backend(settings, model, in_channels, workdir / f"{tag}.pt", concurrent=concurrent,
                          onnx_path=workdir / f"{tag}.onnx")


def preprocessor(loaded: LoadedModel, config: Config, **changes: Any) -> Preprocessor:
    """The pipeline's preprocessing for ``loaded`` (:func:`app.pipeline.factory.build_preprocessor`),
    with ``changes``."""
    from app.pipeline.factory import build_preprocessor

    return build_preprocessor(config, loaded.meta, **changes)


@dataclass
class Frames:
    """Synthetic interferograms (uint8 H×W) and their ground-truth labels (uint8 H×W, 0/1)."""

    images: list[np.ndarray]
    labels: list[np.ndarray]


@dataclass
class FrameCache:
    """Renders each (size, count) once; ``write_png`` stores a size's frames as a PNG sequence."""

    workdir: Path
    _frames: dict[tuple[int, int], Frames] = field(default_factory=dict)
    _folders: dict[tuple[int, int], Path] = field(default_factory=dict)

    def frames(self, size: int, count: int) -> Frames:
        key = (size, count)
        if key not in self._frames:
            from app.config import SynthConfig
            from app.synthesis.generator import InterferogramSequence

            sequence = InterferogramSequence(SynthConfig(size=size, frames=count))
            rendered = [sequence.frame(i) for i in range(count)]
            self._frames[key] = Frames([f.image for f in rendered],
                                       [np.where(f.mask == 1, 1, 0).astype(np.uint8) for f in rendered])
        return self._frames[key]

    def png_folder(self, size: int, count: int) -> Path:
        key = (size, count)
        if key not in self._folders:
            import cv2

            folder = self.workdir / f"frames-{size}-{count}"
            folder.mkdir(parents=True, exist_ok=True)
            for index, image in enumerate(self.frames(size, count).images):
                if not cv2.imwrite(str(folder / f"{index:06d}.png"), image):
                    raise OSError(f"cannot write {folder}")
            self._folders[key] = folder
        return self._folders[key]


@dataclass
class Context:
    """Everything the sections share: config, the model, rendered frames, a scratch folder, a logger."""

    config: Config
    loaded: LoadedModel
    cache: FrameCache
    workdir: Path
    log: Callable[[str], None] = lambda _: None
    _backends: dict[str, Any] = field(default_factory=dict)

    def backend(self, name: str, concurrent: bool = False) -> Any:
        """The shipped model on backend ``name`` (built once per thread policy, ONNX exported once);
        ``concurrent``: with the thread count the threaded pipeline uses."""
        key = f"{name}{' concurrent' if concurrent else ''}"
        if key not in self._backends:
            self._backends[key] = make_backend(name, self.loaded.model, self.loaded.meta.in_channels,
                                               self.config, self.workdir, tag="shipped", concurrent=concurrent)
        return self._backends[key]
