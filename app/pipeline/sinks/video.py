"""MP4/AVI video of the overlays (``--out``, ``output.video``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from app.errors import EXIT_FAILURE
from app.files import commit, discard, prepare, require_space
from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec, sink_errors

if TYPE_CHECKING:
    from app.config import OutputConfig

VIDEO_FOURCCS = ("mp4v", "avc1", "MJPG", "XVID")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv")
INDEX_BYTES_PER_FRAME = 32
"""Room kept free per frame written, for the index ``release()`` writes last (the MP4 ``moov`` atom)."""


class VideoSink:
    """Overlays -> a video file via cv2.VideoWriter, trying ``fourccs`` in order (mp4v first).

    The path is checked when the sink is made (a regular file with a video extension, room on the
    disk); the writer opens at the first frame (its size fixes the video size; later frames of another
    size are resized). Writing stops with :class:`SinkError` before the disk is full (keeping room for
a key frame and the index, so the file can still be finished); ``close()``
    reopens the finished file and checks every frame is there before renaming it into place (OpenCV
    reports no write error itself). Raises :class:`SinkError` when no codec opens.
    """

    def __init__(self, path: str | Path, fps: float = 25.0, fourccs: Sequence[str] = VIDEO_FOURCCS) -> None:
        self.output = SPEC.check(path)
        self.path = self.output.name
        with sink_errors():
            prepare(self.output)
        self.fps = fps if fps > 0 else 25.0
        self.fourccs = tuple(fourccs)
        self.fourcc: str | None = None
        self.frames = 0
        self._partial = self.output.partial
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self._bytes = 0
        self._largest_step = 0
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
        with sink_errors():
            require_space(self.output.target.parent, self._room_needed(), name=self.path, exit_code=EXIT_FAILURE)
        if self._writer is None:
            self._size = (image.shape[1], image.shape[0])
            self._writer = self._open(self._size)
        if (image.shape[1], image.shape[0]) != self._size:
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(image)
        self.frames += 1

    def _room_needed(self) -> int:
        """Bytes to keep free before the next frame: the index for every frame, plus twice the largest
        step the file has grown by so far (a key frame, or the encoder's buffer being written out)."""
        if self._writer is not None:
            size = os.stat(self._partial).st_size
            self._largest_step = max(self._largest_step, size - self._bytes)
            self._bytes = size
        return INDEX_BYTES_PER_FRAME * (self.frames + 1) + 2 * self._largest_step

    def close(self) -> None:
        """Finish the file: release the writer, check it reads back, rename it into place; with no
        frame written, leave nothing. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is None:
            return
        self._writer.release()
        if not self.frames:
            discard(self.output)
            return
        with sink_errors():
            commit(self.output, verify=self._reads_back)

    def _reads_back(self, partial: Path) -> str | None:
        """What is wrong with the finished temporary file, or None: it opens, holds every frame, and
        its last frame decodes."""
        capture = cv2.VideoCapture(str(partial))
        try:
            if not capture.isOpened():
                return "the finished video cannot be read back"
            count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            if count != self.frames:
                return f"{count} of {self.frames} frames can be read back"
            capture.set(cv2.CAP_PROP_POS_FRAMES, count - 1)
            if not capture.read()[0]:
                return "its last frame cannot be decoded"
            return None
        finally:
            capture.release()


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> VideoSink:
    return VideoSink(path, output.video_fps)


SPEC = SinkSpec("video", "--out", "FILE.mp4", "write the overlay video (.mp4, .m4v, .mov, .avi or .mkv)",
                _open, "bench.mp4", suffixes=VIDEO_SUFFIXES)
