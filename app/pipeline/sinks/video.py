"""MP4/AVI video of the overlays (``--out``, ``output.video``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from app.files import partial_path
from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec, prepare_output

if TYPE_CHECKING:
    from app.config import OutputConfig

VIDEO_FOURCCS = ("mp4v", "avc1", "MJPG", "XVID")

class VideoSink:
    """Overlays -> a video file via cv2.VideoWriter, trying ``fourccs`` in order (mp4v first).

    Opened at the first frame (its size fixes the video size; later frames of another size are
    resized). Raises :class:`SinkError` when no codec opens.
    """

    def __init__(self, path: str | Path, fps: float = 25.0, fourccs: Sequence[str] = VIDEO_FOURCCS) -> None:
        self.path = prepare_output(path)
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


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> VideoSink:
    return VideoSink(path, output.video_fps)


SPEC = SinkSpec("video", "--out", "FILE.mp4", "write the overlay video", _open, "bench.mp4")
