"""Build the pipeline's stages from a Config: the one factory the CLIs, benchmarks and tests use."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.config import PipelineConfig
from app.pipeline.inference import InferenceWorker
from app.pipeline.overlay import OverlayRenderer
from app.pipeline.readout import ReadOut
from app.pipeline.runner import Display, Pipeline, PipelineResult, Progress, run_sequential
from app.pipeline.sinks import SINKS, Sink, close_all, open_sinks
from app.pipeline.sources import Source, open_source

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from app.config import Config


@dataclass
class Stages:
    """Everything a run needs, built from a Config (see :func:`build_stages`)."""

    source: Source
    preprocessor: Callable[[np.ndarray], np.ndarray]
    inference: InferenceWorker
    renderer: OverlayRenderer
    sinks: list[Sink]
    meta: Any
    readout: ReadOut | None = None

    def pipeline(self, settings: PipelineConfig, *, display: Display | None = None,
                 progress: Progress | None = None) -> Pipeline:
        return Pipeline(self.source, self.preprocessor, self.inference, self.renderer, self.sinks, settings,
                        display=display, progress=progress, readout=self.readout)

    def run_sequential(self, settings: PipelineConfig, *, display: Display | None = None,
                       progress: Progress | None = None) -> PipelineResult:
        return run_sequential(self.source, self.preprocessor, self.inference, self.renderer, self.sinks,
                              settings, display=display, progress=progress, readout=self.readout)

    def close(self) -> None:
        """Release the source and finalise the sinks without running (e.g. after a setup error)."""
        close_all(self.sinks)
        self.source.close()


def place_hologram_stage(preprocessor: Any, backend: Any) -> None:
    """Run the hologram stage inside a torch backend (``torch.fft`` on its device) when
    ``preprocess.hologram_backend`` is ``torch``, or ``auto`` and the model runs on CUDA; else it stays in
    the preprocessing thread (NumPy/SciPy). ONNX and other backends always keep the NumPy path."""
    demodulator = getattr(preprocessor, "demodulator", None)
    choice = preprocessor.settings.hologram_backend if demodulator is not None else "numpy"
    on_torch = hasattr(backend, "set_input_transform")
    if choice == "torch" and not on_torch:
        log.warning("preprocess.hologram_backend=torch needs the torch backend; demodulating with NumPy")
    if on_torch and (choice == "torch" or (choice == "auto" and str(backend.device).startswith("cuda"))):
        backend.set_input_transform(preprocessor.device_demodulator(str(backend.device)))


def load_model(config: Config, *, num_classes: int | None = None) -> tuple[Any, Any]:
    """``(model, meta)`` from ``config.model.weights`` (:func:`models.load_checkpoint`); ``num_classes``
    asserts the class count. Raises CheckpointError."""
    from models import load_checkpoint

    return load_checkpoint(Path(config.model.weights), num_classes=num_classes)


def build_preprocessor(config: Config, meta: Any, **changes: Any) -> Any:
    """The checkpoint's preprocessing (channels, normalisation and the recorded recipe) with
    ``config.preprocess`` on top, and ``changes`` (PreprocessSettings fields) on top of that."""
    import dataclasses

    from app.pipeline.preprocess import Preprocessor, settings_from

    recorded = (meta.train_config or {}).get("preprocess")
    settings = settings_from(config.preprocess, meta.in_channels, meta.normalization,
                             recorded if isinstance(recorded, dict) else None)
    return Preprocessor(dataclasses.replace(settings, **changes) if changes else settings)


def build_backend(config: Config, model: Any, meta: Any, *, concurrent: bool = True,
                  onnx_path: str | Path | None = None) -> Any:
    """The backend ``config.model.backend`` names (:data:`app.pipeline.backends.BACKENDS`)."""
    from app.pipeline.backends import create_backend

    return create_backend(config.model, model, meta.in_channels, config.model.weights, concurrent=concurrent,
                          onnx_path=onnx_path)


def build_inference(config: Config, backend: Any, meta: Any = None) -> InferenceWorker:
    """The batching worker around ``backend`` with ``pipeline.batch_size``/``batch_timeout_ms``; with
    the checkpoint's ``meta``, a contact class is taken out of the label maps (see
    :mod:`app.pipeline.inference`)."""
    return InferenceWorker(backend, batch_size=config.pipeline.batch_size,
                           batch_timeout_ms=config.pipeline.batch_timeout_ms, warmup_iters=config.model.warmup_iters,
                           contact_class=getattr(meta, "contact_class", None))


def build_renderer(config: Config, palette: Any) -> OverlayRenderer:
    """The overlay renderer ``config.overlay`` describes, in the checkpoint's ``palette``."""
    overlay = config.overlay
    return OverlayRenderer(palette, alpha=overlay.alpha, contours=overlay.contours,
                           contour_thickness=overlay.contour_thickness, hud=overlay.hud, base=overlay.base,
                           trail_frames=config.objects.trail_frames)


def build_readout(config: Config, meta: Any, source: Any) -> ReadOut | None:
    """The object read-out (objects, tracks, phase and dry mass per frame) when an output asks for it
    (a sink with ``readout`` in :data:`~app.pipeline.sinks.SINKS`), else None: measuring costs time."""
    wanted = [spec for spec in SINKS.values() if spec.readout and getattr(config.output, spec.config_key)]
    if not wanted:
        return None
    info = source.info
    optics, origin = config.optics, "config"
    stated = info.pixel_size_um
    if optics.pixel_size_from_file and stated is not None and FILE_PIXEL_SIZE_UM[0] <= stated <= FILE_PIXEL_SIZE_UM[1]:
        optics, origin = dataclasses.replace(optics, pixel_size_um=float(stated)), "file"
        log.info("pixel size %.4g µm from %s (optics.pixel_size_from_file)", stated, info.uri)
    elif stated is not None and optics.pixel_size_from_file:
        log.warning("ignoring the pixel size %.4g µm that %s states (outside %g-%g µm): using optics.pixel_size_um",
                    stated, info.uri, *FILE_PIXEL_SIZE_UM)
    return ReadOut(optics, config.objects, classes=range(1, meta.num_labels),
                   fps=None if info.live else (info.fps or config.source.fps), pixel_size_origin=origin)


FILE_PIXEL_SIZE_UM = (0.01, 50.0)
"""Pixel sizes a file may state and be believed: a microscope camera's in the object plane. A TIFF
that says 72 dpi (a screen's default, 352.8 µm) is not describing a microscope."""


def build_stages(config: Config, *, realtime: bool = True, num_classes: int | None = None,
                 backend: Any = None) -> Stages:
    """Every stage from ``config``: source, the checkpoint's preprocessing, inference, overlay, sinks.

    ``num_classes`` asserts the class count (CheckpointError otherwise). ``backend`` replaces the one
    :func:`build_backend` would make. ``realtime=False`` opens the source for replay (file semantics).
    The source is opened first, so a bad one fails in well under a second, before PyTorch is imported
    and the model loaded. Raises the stage's own typed errors (SourceError, CheckpointError,
    BackendError, SinkError, ConfigError).
    """
    source = open_source(config.source.uri, config, realtime=realtime)
    try:
        model, meta = load_model(config, num_classes=num_classes)
        if backend is None:
            backend = build_backend(config, model, meta)
        preprocessor = build_preprocessor(config, meta)
        place_hologram_stage(preprocessor, backend)
        stages = Stages(source, preprocessor, build_inference(config, backend, meta), build_renderer(config, meta.palette),
                        open_sinks(config.output, meta.label_names), meta, build_readout(config, meta, source))
    except BaseException:
        source.close()
        raise
    return stages
