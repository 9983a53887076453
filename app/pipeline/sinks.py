"""Writers: MP4 video, animated GIF, label-map PNG folder, per-frame statistics table (CSV / JSONL).

Every sink has ``write(item: Rendered)`` and ``close()``. Files are written under a temporary name in
the destination folder (``.NAME.partial.EXT``) and moved into place with ``os.replace`` by ``close()``,
so a file on disk under its real name is always complete and playable. ``close()`` is idempotent and
meant to be called in a ``finally``: on Ctrl-C or a failure elsewhere the frames written so far still
become a valid file. A sink that received no frame leaves no file behind. Failures raise
:class:`SinkError` (one line). Sinks are used from one thread.

The live window is not a sink here: windows belong to the CLI layer (:mod:`app.cli`), which shows
the newest overlay from the main thread.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from app.errors import AppError
from app.pipeline.frames import Frame

if TYPE_CHECKING:
    from app.config import OutputConfig

log = logging.getLogger(__name__)

VIDEO_FOURCCS = ("mp4v", "avc1", "MJPG", "XVID")


class SinkError(AppError, OSError):
    """An output cannot be created or written (message is one line for the user)."""


@dataclass(frozen=True)
class Rendered:
    """One finished frame: the source frame, its H×W uint8 labels, the BGR overlay, latency so far (ms)."""

    frame: Frame
    labels: np.ndarray
    overlay: np.ndarray
    latency_ms: float


class Sink(Protocol):
    path: Path

    def write(self, item: Rendered) -> None: ...

    def close(self) -> None: ...


def partial_path(path: Path) -> Path:
    """Temporary name next to ``path`` that keeps its extension (encoders choose the format by it)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SinkError(f"cannot create folder {path.parent}: {exc.strerror or exc}") from exc
    if not os.access(path.parent, os.W_OK):
        raise SinkError(f"cannot write to folder {path.parent}")
    return path


class VideoSink:
    """Overlays -> a video file via cv2.VideoWriter, trying ``fourccs`` in order (mp4v first).

    Opened at the first frame (its size fixes the video size; later frames of another size are
    resized). Raises :class:`SinkError` when no codec opens.
    """

    def __init__(self, path: str | Path, fps: float = 25.0, fourccs: Sequence[str] = VIDEO_FOURCCS) -> None:
        self.path = _prepare(path)
        self.fps = fps if fps > 0 else 25.0
        self.fourccs = tuple(fourccs)
        self.fourcc: str | None = None
        self.frames = 0
        self._partial = partial_path(self.path)
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self._closed = False

    def _open(self, size: tuple[int, int]) -> cv2.VideoWriter:
        for fourcc in self.fourccs:
            writer = cv2.VideoWriter(str(self._partial), cv2.VideoWriter_fourcc(*fourcc), self.fps, size)
            if writer.isOpened():
                self.fourcc = fourcc
                return writer
            writer.release()
        self._partial.unlink(missing_ok=True)
        raise SinkError(f"cannot open a video writer for {self.path} (tried codecs {', '.join(self.fourccs)})")

    def write(self, item: Rendered) -> None:
        self.write_image(item.overlay)

    def write_image(self, image: np.ndarray) -> None:
        """Append one H×W×3 uint8 BGR image."""
        if self._writer is None:
            self._size = (image.shape[1], image.shape[0])
            self._writer = self._open(self._size)
        if (image.shape[1], image.shape[0]) != self._size:
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(image)
        self.frames += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.release()
            if self.frames:
                os.replace(self._partial, self.path)
        self._partial.unlink(missing_ok=True)


class GifSink:
    """Overlays -> an animated GIF (``cv2.imwriteanimation``), kept to a sensible size.

    Keeps every ``stride``-th frame, scaled by ``scale``, at most ``max_frames`` of them (held in
    memory, encoded by ``close()``), played back at ``fps``, looping forever.
    """

    def __init__(self, path: str | Path, fps: float = 12.0, stride: int = 2, scale: float = 0.5,
                 max_frames: int = 120) -> None:
        if stride < 1 or scale <= 0 or max_frames < 1 or fps <= 0:
            raise SinkError(f"GIF settings must be positive (stride {stride}, scale {scale}, "
                            f"max_frames {max_frames}, fps {fps})")
        self.path = _prepare(path)
        self.fps = fps
        self.stride = stride
        self.scale = scale
        self.max_frames = max_frames
        self.frames_seen = 0
        self._frames: list[np.ndarray] = []
        self._closed = False

    @property
    def frames(self) -> int:
        return len(self._frames)

    def write(self, item: Rendered) -> None:
        seen = self.frames_seen
        self.frames_seen += 1
        if seen % self.stride or len(self._frames) >= self.max_frames:
            return
        image = item.overlay
        if self._frames:
            height, width = self._frames[0].shape[:2]
        else:
            height = max(1, round(image.shape[0] * self.scale))
            width = max(1, round(image.shape[1] * self.scale))
        if image.shape[:2] != (height, width):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        else:
            image = image.copy()
        self._frames.append(image)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._frames:
            return
        animation = cv2.Animation()
        animation.frames = self._frames
        animation.durations = [max(10, round(1000.0 / self.fps))] * len(self._frames)
        animation.loop_count = 0
        partial = partial_path(self.path)
        try:
            ok = cv2.imwriteanimation(str(partial), animation)
        except cv2.error as exc:
            partial.unlink(missing_ok=True)
            raise SinkError(f"cannot write GIF {self.path}: {exc}") from exc
        if not ok:
            partial.unlink(missing_ok=True)
            raise SinkError(f"cannot write GIF {self.path}")
        os.replace(partial, self.path)
        self._frames = []


class MaskFolderSink:
    """Label maps -> ``FOLDER/000000.png`` … (uint8 class ids, named by frame index), one file each."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create mask folder {self.path}: {exc.strerror or exc}") from exc
        self.frames = 0

    def write(self, item: Rendered) -> None:
        target = self.path / f"{item.frame.index:06d}.png"
        partial = partial_path(target)
        if not cv2.imwrite(str(partial), np.ascontiguousarray(item.labels, dtype=np.uint8)):
            raise SinkError(f"cannot write mask {target}")
        os.replace(partial, target)
        self.frames += 1

    def close(self) -> None:
        """Nothing to finalise: every PNG is complete when ``write`` returns."""


class FrameStatsSink:
    """Per-frame statistics -> CSV (``.csv``) or JSON lines (any other extension, e.g. ``.jsonl``).

    Columns: ``frame`` (index), ``timestamp`` (capture time, perf_counter s), ``latency_ms``
    (capture -> overlay), ``components`` (connected regions of non-background, 8-connected), then
    one column per class name with its pixel fraction.
    """

    def __init__(self, path: str | Path, class_names: Sequence[str]) -> None:
        self.path = _prepare(path)
        self.class_names = list(class_names)
        self.as_csv = self.path.suffix.lower() == ".csv"
        self.frames = 0
        self._partial = partial_path(self.path)
        try:
            self._file: IO[str] | None = open(self._partial, "w", newline="")
        except OSError as exc:
            raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self._csv = csv.writer(self._file) if self.as_csv else None
        if self._csv is not None:
            self._csv.writerow(["frame", "timestamp", "latency_ms", "components", *self.class_names])

    def row(self, item: Rendered) -> dict[str, Any]:
        labels = item.labels
        counts = np.bincount(labels.ravel(), minlength=len(self.class_names))
        foreground = cv2.compare(labels, 0, cv2.CMP_NE)
        components = cv2.connectedComponents(foreground, connectivity=8)[0] - 1
        row: dict[str, Any] = {"frame": item.frame.index, "timestamp": round(item.frame.timestamp, 6),
                               "latency_ms": round(item.latency_ms, 3), "components": int(components)}
        for index, name in enumerate(self.class_names):
            row[name] = round(float(counts[index]) / labels.size, 6)
        return row

    def write(self, item: Rendered) -> None:
        if self._file is None:
            raise SinkError(f"{self.path} is already closed")
        row = self.row(item)
        if self._csv is not None:
            self._csv.writerow(row.values())
        else:
            self._file.write(json.dumps(row) + "\n")
        self.frames += 1

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self.frames:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)


def open_sinks(output: OutputConfig, class_names: Sequence[str]) -> list[Sink]:
    """The file sinks the output section asks for (video, gif, masks_dir, csv), in that order."""
    sinks: list[Sink] = []
    try:
        if output.video:
            sinks.append(VideoSink(output.video, output.video_fps))
        if output.gif:
            sinks.append(GifSink(output.gif, output.gif_fps, output.gif_stride, output.gif_scale,
                                 output.gif_max_frames))
        if output.masks_dir:
            sinks.append(MaskFolderSink(output.masks_dir))
        if output.csv:
            sinks.append(FrameStatsSink(output.csv, class_names))
    except BaseException:
        close_all(sinks)
        raise
    return sinks


def close_all(sinks: Sequence[Sink]) -> SinkError | None:
    """Close every sink even when some fail; returns the first failure (as SinkError) or None."""
    first: SinkError | None = None
    for sink in sinks:
        try:
            sink.close()
        except Exception as exc:
            log.error("closing %s failed: %s", sink.path, exc)
            if first is None:
                first = exc if isinstance(exc, SinkError) else SinkError(f"closing {sink.path} failed: {exc}")
    return first
