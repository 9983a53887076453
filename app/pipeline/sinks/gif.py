"""Animated GIF of the overlays (``--gif``, ``output.gif``), encoded frame by frame as they arrive."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

import cv2
import numpy as np

from app.errors import EXIT_FAILURE
from app.files import OutputError, commit, discard, open_output, prepare, require_space
from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec, sink_errors

if TYPE_CHECKING:
    from app.config import OutputConfig

TRAILER = b"\x3b"
EXTENSION, IMAGE, GRAPHIC_CONTROL = 0x21, 0x2C, 0xF9


def split_gif(data: bytes) -> tuple[bytes, bytes]:
    """A GIF's bytes -> (header, frames): the header is everything before the first frame (signature,
    screen descriptor, global colour table, loop extension), the frames run up to the trailer byte.
    Raises ValueError for anything that is not a complete GIF."""
    if data[:6] not in (b"GIF87a", b"GIF89a") or len(data) < 14 or data[-1:] != TRAILER:
        raise ValueError("not a complete GIF")
    position = 13
    if data[10] & 0x80:  # global colour table: 3 × 2^(size + 1) bytes
        position += 3 << ((data[10] & 0x07) + 1)
    while position < len(data) - 1:
        if data[position] == IMAGE or (data[position] == EXTENSION and data[position + 1] == GRAPHIC_CONTROL):
            return data[:position], data[position:-1]
        if data[position] != EXTENSION:
            raise ValueError(f"unexpected GIF block 0x{data[position]:02x}")
        position += 2
        while data[position]:  # data sub-blocks, ended by a zero length
            position += data[position] + 1
        position += 1
    raise ValueError("a GIF without frames")


class GifSink:
    """Overlays -> an animated GIF, kept to a sensible size.

    Keeps every ``stride``-th frame, scaled by ``scale``, at most ``max_frames`` of them, played back at
    ``fps``, looping forever. Each kept frame is encoded as it arrives by OpenCV's encoder
    (``cv2.imencodeanimation`` of one frame; OpenCV's GIF frames are independent and share one fixed
    colour table, so the file is byte for byte what encoding all frames at once would give) and
    appended to the temporary file. Memory stays at one frame, and ``close()`` only adds the trailer
    byte, checks the file and renames it: milliseconds, however long the GIF. Writing stops with
    :class:`SinkError` before the disk is full, leaving a complete GIF of the frames so far.
    """

    def __init__(self, path: str | Path, fps: float = 12.0, stride: int = 2, scale: float = 0.5,
                 max_frames: int = 120) -> None:
        if stride < 1 or scale <= 0 or max_frames < 1 or fps <= 0:
            raise SinkError(f"GIF settings must be positive (stride {stride}, scale {scale}, "
                              f"max_frames {max_frames}, fps {fps})")
        self.output = SPEC.check(path)
        self.path = self.output.name
        with sink_errors():
            prepare(self.output)
        self.fps = fps
        self.stride = stride
        self.scale = scale
        self.max_frames = max_frames
        self.frames_seen = 0
        self.frames = 0
        self._size: tuple[int, int] | None = None
        self._header = b""
        self._bytes = 0
        self._file: IO[bytes] | None = None
        self._broken = False
        self._closed = False

    def write(self, item: Rendered) -> None:
        seen = self.frames_seen
        self.frames_seen += 1
        if seen % self.stride or self.frames >= self.max_frames or self._broken or self._closed:
            return
        image = item.overlay
        if self._size is None:
            self._size = (max(1, round(image.shape[1] * self.scale)), max(1, round(image.shape[0] * self.scale)))
        if (image.shape[1], image.shape[0]) != self._size:
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
        with sink_errors(self.output):
            header, frame = self._encode(image)
            require_space(self.output.target.parent, len(frame) + len(TRAILER) + (0 if self._file else len(header)),
                          name=self.path, exit_code=EXIT_FAILURE)
            if self._file is None:
                self._file = open_output(self.output, "wb")
                self._header = header
                self._append(header)
            elif header != self._header:
                raise OutputError(f"cannot write {self.path}: OpenCV's GIF encoder changed the colour table "
                                  f"between frames", EXIT_FAILURE)
            self._append(frame)
        self.frames += 1

    def _encode(self, image: np.ndarray) -> tuple[bytes, bytes]:
        animation = cv2.Animation()
        animation.frames = [np.ascontiguousarray(image)]
        animation.durations = [max(10, round(1000.0 / self.fps))]
        animation.loop_count = 0
        try:
            ok, buffer = cv2.imencodeanimation(".gif", animation)
            if not ok:
                raise ValueError("the encoder gave up")
            return split_gif(buffer.tobytes())
        except (cv2.error, ValueError) as exc:
            raise OutputError(f"cannot encode a GIF frame for {self.path}: {exc}", EXIT_FAILURE) from exc

    def _append(self, data: bytes) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except BaseException:
            self._broken = True  # a partly written frame: the file cannot be finished
            raise
        self._bytes += len(data)

    def close(self) -> None:
        """Finish the file (trailer, flush, check, rename); with no frame written, or after a failed
        write, leave nothing. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._file is None:
            return
        if self._broken:
            discard(self.output, self._file)
            return
        with sink_errors(self.output):
            try:
                self._append(TRAILER)
            except BaseException:
                discard(self.output, self._file)
                raise
            commit(self.output, self._file, verify=self._complete)

    def _complete(self, partial: Path) -> str | None:
        with open(partial, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(max(0, size - 1))
            last = handle.read(1)
        if size != self._bytes:
            return f"{size} of {self._bytes} bytes reached the disk"
        return None if last == TRAILER else "the GIF trailer is missing"


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> GifSink:
    return GifSink(path, output.gif_fps, output.gif_stride, output.gif_scale, output.gif_max_frames)


SPEC = SinkSpec("gif", "--gif", "FILE.gif",
                "write an overlay GIF; output.gif_stride/gif_scale/gif_max_frames/gif_fps keep it small",
                _open, "bench.gif", suffixes=(".gif",))
