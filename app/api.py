"""The Python API: a checkpoint on one image, or a whole source streamed through the pipeline.

::

    from app import Segmenter

    seg = Segmenter("weights/icnet_interferogram.pt", device="auto")
    labels = seg.predict(image)                  # H×W uint8 class ids
    for result in seg.stream("run.tif"):         # a video, image folder, glob, TIFF stack, camera0, ...
        ...  # result.labels, .overlay, .frame_index, .timestamp, .stats

:meth:`Segmenter.stream` runs the same threaded pipeline as ``cellseg replay`` / ``cellseg live``
(:func:`app.pipeline.factory.build_stages`, :class:`app.pipeline.runner.Pipeline`), with one more sink
that hands each finished frame to the loop. Threads, queues and their policies are unchanged: a file
source is never dropped from, and a loop body slower than the model holds the pipeline back
(backpressure); a live source (``realtime=True``) drops its oldest frames instead. Leaving the loop
early (``break``, an exception, ``close()``) stops the pipeline and joins its threads.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.config import Config, ConfigError, load_config, replace
from app.errors import AppError
from app.pipeline.factory import build_backend, build_inference, build_preprocessor, build_stages, load_model
from app.pipeline.queues import POLL_S
from app.pipeline.runner import PipelineError, PipelineResult
from app.pipeline.sinks import Rendered

__all__ = ["Result", "Segmenter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """One frame from :meth:`Segmenter.stream`.

    ``labels``: H×W uint8 class ids at the frame's size; ``overlay``: H×W×3 BGR uint8 picture (as the
    GIF/MP4 get it); ``frame_index``: the frame's place in its source; ``timestamp``: seconds since the
    stream's first frame was captured; ``name``: the source file's name, when frames come from files;
    ``stats``: ``latency_ms`` (capture to overlay), ``frames_dropped`` so far and ``class_fractions``
    (class name -> share of pixels); ``readout``: the objects measured, when an object output is on.
    """

    labels: np.ndarray
    overlay: np.ndarray
    frame_index: int
    timestamp: float
    name: str | None
    stats: dict[str, Any]
    readout: Any = None


class StreamClosed(AppError):
    """The loop reading a stream left it: the hand-off sink stops the pipeline with this."""


class _Handoff:
    """The sink :meth:`Segmenter.stream` adds: each finished frame into a bounded queue the loop reads,
    waiting while it is full (backpressure) and raising :class:`StreamClosed` once the loop has left."""

    path = Path("<stream>")

    def __init__(self, depth: int) -> None:
        self.items: queue.Queue[Rendered] = queue.Queue(maxsize=depth)
        self.left = threading.Event()

    def write(self, item: Rendered) -> None:
        while not self.left.is_set():
            try:
                self.items.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue
        raise StreamClosed("the loop reading the stream has left")

    def close(self) -> None:
        """Nothing to finish: the loop has every frame already."""


class Segmenter:
    """A checkpoint, loaded once, with the configuration it runs under.

    ``weights``: a checkpoint file (default ``model.weights``, the shipped model; ``weights/NAME.pt`` finds
    the shipped one from any directory). ``device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (default
    ``model.device``). ``half``: fp16 on CUDA (``model.precision``; the CPU runs fp32). ``backend``:
    ``torch`` or ``onnx``. ``config``: a config.yaml path or a :class:`~app.config.Config` (default the
    shipped config.yaml). ``overrides``: ``{"section.key": value}``, e.g. ``{"pipeline.batch_size": 2}``,
    checked like ``--set``. Raises :class:`~app.config.ConfigError` or :class:`models.CheckpointError`.
    """

    def __init__(self, weights: str | Path | None = None, *, device: str | None = None, half: bool = False,
                 backend: str | None = None, config: str | Path | Config | None = None,
                 overrides: Mapping[str, Any] | None = None) -> None:
        base = config if isinstance(config, Config) else load_config(config)
        changes: dict[str, dict[str, Any]] = defaultdict(dict)
        for dotted, value in (overrides or {}).items():
            section, _, key = dotted.partition(".")
            if not key:
                raise ConfigError(f"override '{dotted}' must name a section and a key, e.g. pipeline.batch_size")
            changes[section][key] = value
        model = {"weights": None if weights is None else str(weights), "device": device,
                 "precision": "fp16" if half else None, "backend": backend}
        changes["model"].update({key: value for key, value in model.items() if value is not None})
        self.config: Config = replace(base, **changes)
        self.model, self.meta = load_model(self.config)
        self._predictor: Any = None
        self.last_result: PipelineResult | None = None  # statistics of the last finished stream

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.meta.label_names

    def predict(self, image: np.ndarray) -> np.ndarray:
        """H×W uint8 class ids for one H×W or H×W×C image (uint8, uint16, or float scaled 0..1; colour
        in BGR order, as OpenCV reads it). Each image is preprocessed on its own (a background model or
        the hologram reference starts afresh); for the frames of one sequence use :meth:`stream`."""
        image = _checked(image)
        if self._predictor is None:
            backend = build_backend(self.config, self.model, self.meta, concurrent=False)
            if "cuda" not in str(backend.device) and self.config.model.precision != "fp32":
                log.warning("%s precision needs CUDA; %s runs fp32", self.config.model.precision, backend.name)
            self._predictor = build_inference(self.config, backend, self.meta)
        tensor = build_preprocessor(self.config, self.meta)(image)
        return self._predictor.predict([tensor], [image.shape[:2]])[0]

    def stream(self, source: str | Path, *, realtime: bool = False, max_frames: int | None = None) -> Iterator[Result]:
        """Yield a :class:`Result` per frame of ``source`` as the threaded pipeline finishes it.

        ``source`` is anything ``--source`` takes; it opens on the first iteration. ``realtime=False``
        (default) reads it with file semantics, never dropping a frame; ``True`` runs it as a live source.
        Outputs configured in ``output.*`` (a GIF, MP4, masks, CSV) are written too. After the loop,
        :attr:`last_result` holds the run's statistics. A failing stage raises
        :class:`~app.pipeline.runner.PipelineError` in the loop.
        """
        changes: dict[str, dict[str, Any]] = {"source": {"uri": str(source)}, "output": {"display": False}}
        if max_frames is not None:
            changes["pipeline"] = {"max_frames": max_frames}
        config = replace(self.config, **changes)
        stages = build_stages(config, realtime=realtime, backend=build_backend(config, self.model, self.meta))
        handoff = _Handoff(config.pipeline.queue_size)
        stages.sinks.append(handoff)
        try:
            pipeline = stages.pipeline(config.pipeline)
        except BaseException:
            stages.close()
            raise
        outcome: dict[str, Any] = {}
        finished = threading.Event()

        def drive() -> None:
            try:
                outcome["result"] = pipeline.run()
            except BaseException as exc:  # re-raised in the loop's thread
                outcome["error"] = exc
            finally:
                finished.set()

        driver = threading.Thread(target=drive, name="cellseg stream", daemon=True)
        driver.start()
        first_capture: float | None = None
        try:
            while True:
                try:
                    item = handoff.items.get(timeout=POLL_S)
                except queue.Empty:
                    if not finished.is_set():
                        continue
                    try:  # the run has ended: whatever it handed over before is still to come
                        item = handoff.items.get_nowait()
                    except queue.Empty:
                        break
                if first_capture is None:
                    first_capture = item.frame.timestamp
                yield self._result(item, item.frame.timestamp - first_capture, pipeline.frames_dropped())
        finally:
            handoff.left.set()
            pipeline.stop()  # a live source would otherwise read on until the hand-off refuses a frame
            driver.join(timeout=3 * config.pipeline.join_timeout_s + 1.0)
        error = outcome.get("error")
        if isinstance(error, PipelineError) and isinstance(error.cause, StreamClosed):
            error = None
        if error is not None:
            raise error
        self.last_result = outcome.get("result")

    def _result(self, item: Rendered, timestamp: float, dropped: int) -> Result:
        labels = item.labels
        counts = np.bincount(labels.ravel(), minlength=len(self.class_names))
        fractions = {name: float(counts[index]) / labels.size for index, name in enumerate(self.class_names)}
        stats = {"latency_ms": item.latency_ms, "frames_dropped": dropped, "class_fractions": fractions}
        return Result(labels, item.overlay, item.frame.index, timestamp, item.frame.name, stats, item.readout)


def _checked(image: Any) -> np.ndarray:
    """The image as predict takes it (H×W or H×W×1/3/4; uint8, uint16 or float32); else an
    :class:`~app.errors.AppError` naming what it got."""
    if not isinstance(image, np.ndarray):
        raise AppError(f"predict takes a NumPy image, got {type(image).__name__}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))) or min(image.shape[:2]) < 1:
        raise AppError(f"predict takes an H×W or H×W×C (C = 1, 3, 4) image, got shape {image.shape}")
    if image.dtype in (np.uint8, np.uint16):
        return image
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise AppError(f"predict takes uint8, uint16 or float images, got {image.dtype}")
