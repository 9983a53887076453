"""MP4/MOV/MKV/AVI video of the overlays (``--out``, ``output.video``): H.264 through PyAV, or OpenCV's
mp4v when PyAV (or its H.264 encoder) is missing."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from app.errors import EXIT_FAILURE
from app.files import commit, discard, prepare, require_space, write_error
from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec, sink_errors

if TYPE_CHECKING:
    from app.config import OutputConfig

log = logging.getLogger(__name__)

VIDEO_FOURCCS = ("mp4v", "avc1", "MJPG", "XVID")
"""OpenCV codecs tried in order when H.264 through PyAV is not available (and for ``.avi``)."""
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv")
H264_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv")
H264_ENCODERS = ("libx264", "h264", "libopenh264")
H264_PRESET = "ultrafast"
"""libx264 speed preset, with one encoder thread: the sinks stage shares the cores with inference, so
speed comes first. Measured on a 512² overlay, one core: ultrafast 1.3 ms a frame, superfast 2.2 ms
with files half the size; mp4v about 1.1 ms with files larger than either."""
FRAGMENTED_MP4 = "frag_keyframe+empty_moov+default_base_moof"
"""MP4 ``movflags``: a fragment per key frame (one a second) goes to disk as it is done, so the muxer
holds no per-frame index and the partial file of a killed run plays up to its last fragment."""
INDEX_BYTES_PER_FRAME = 32
"""Room kept free per frame written, for the index ``release()`` writes last (the MP4 ``moov`` atom)."""


def h264_encoder() -> str | None:
    """The first H.264 encoder of PyAV's FFmpeg (:data:`H264_ENCODERS`), or None when PyAV is not
    installed or has none."""
    try:
        import av
    except ImportError:
        return None
    for name in H264_ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except ValueError:  # av.codec.codec.UnknownCodecError
            continue
        return name
    return None


class _PyAVWriter:
    """H.264 (yuv420p) through PyAV at ``fps`` into ``path``; MP4/MOV fragmented (:data:`FRAGMENTED_MP4`).
    ``size`` is (width, height), even; ``name`` is the output named in errors."""

    def __init__(self, path: Path, name: Path, encoder: str, fps: float, size: tuple[int, int]) -> None:
        import av

        self.failures: tuple[type[BaseException], ...] = (av.FFmpegError, OSError)
        options = {"movflags": FRAGMENTED_MP4, "flush_packets": "1"} if path.suffix.lower() != ".mkv" else {}
        try:
            self._container = av.open(str(path), mode="w", options=options)
        except self.failures as exc:
            raise SinkError(f"cannot open an H.264 writer for {name}: {exc}") from exc
        try:
            self._stream = self._container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001))
            self._stream.width, self._stream.height = size
            self._stream.pix_fmt = "yuv420p"
            self._stream.codec_context.gop_size = max(1, round(fps))
            self._stream.codec_context.thread_count = 1  # no encoder threads of its own beside the pipeline's
            if encoder == "libx264":
                self._stream.options = {"preset": H264_PRESET}
        except BaseException as exc:
            self._container.close()
            if isinstance(exc, self.failures):
                raise SinkError(f"cannot open an H.264 writer for {name}: {exc}") from exc
            raise
        self._av = av
        self._frames = 0

    def write(self, image: np.ndarray) -> None:
        # OpenCV's BGR -> I420 (BT.601, limited range, as swscale's) is about 0.5 ms a 512² frame faster
        frame = self._av.VideoFrame.from_ndarray(cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420), format="yuv420p")
        frame.pts = self._frames
        self._container.mux(self._stream.encode(frame))
        self._frames += 1

    def release(self) -> None:
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()


class _OpenCVWriter:
    """cv2.VideoWriter into ``path`` with the first of ``fourccs`` that opens (``fourcc`` says which)."""

    failures: tuple[type[BaseException], ...] = (cv2.error, OSError)

    def __init__(self, path: Path, name: Path, fourccs: Sequence[str], fps: float, size: tuple[int, int]) -> None:
        for fourcc in fourccs:
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
            if writer.isOpened():
                self.fourcc, self._writer = fourcc, writer
                return
            writer.release()
        path.unlink(missing_ok=True)
        raise SinkError(f"cannot open a video writer for {name} (tried codecs {', '.join(fourccs)})")

    def write(self, image: np.ndarray) -> None:
        self._writer.write(image)

    def release(self) -> None:
        self._writer.release()


class VideoSink:
    """Overlays -> a video file: H.264 through PyAV (:func:`h264_encoder`; fragmented MP4) for .mp4,
    .m4v, .mov and .mkv, else (PyAV or its encoder missing, or .avi) cv2.VideoWriter with the first of
    ``fourccs`` that opens. ``codec`` says which (``"h264"`` or the fourcc, e.g. ``"mp4v"``), once the
    first frame is written, and one log line says so.

    The rate is ``fps`` when given (> 0), else the source's (``SourceInfo.fps`` of the first frame: a
    video's own rate, the synthetic source's ``source.fps``), else ``default_fps`` (image folders,
    cameras that report none). The path is checked when the sink is made (a regular file with a video
    extension, room on the disk); the writer opens at the first frame (its size fixes the video size;
    later frames of another size are resized; H.264 pads an odd side by one pixel). Writing stops with
    :class:`SinkError` before the disk is full (keeping room for a key frame and the index, so the file
    can still be finished); ``close()`` reopens the finished file and checks every frame is there before
    renaming it into place (encoders report no write error themselves). Raises :class:`SinkError` when no
    codec opens.
    """

    def __init__(self, path: str | Path, fps: float | None = None, fourccs: Sequence[str] = VIDEO_FOURCCS,
                 default_fps: float = 25.0) -> None:
        self.output = SPEC.check(path)
        self.path = self.output.name
        with sink_errors():
            prepare(self.output)
        self.fps = fps if fps and fps > 0 else None
        self.default_fps = default_fps if default_fps > 0 else 25.0
        self.fourccs = tuple(fourccs)
        self.codec: str | None = None
        self.frames = 0
        self._partial = self.output.partial
        self._writer: _PyAVWriter | _OpenCVWriter | None = None
        self._size: tuple[int, int] | None = None
        self._pad = (0, 0)
        self._bytes = 0
        self._largest_step = 0
        self._broken = False
        self._closed = False

    def _open(self, size: tuple[int, int], fps: float) -> _PyAVWriter | _OpenCVWriter:
        encoder = h264_encoder() if self.output.target.suffix.lower() in H264_SUFFIXES else None
        if encoder is not None:
            self._pad = (size[0] % 2, size[1] % 2)
            writer: _PyAVWriter | _OpenCVWriter = _PyAVWriter(
                self._partial, self.path, encoder, fps, (size[0] + self._pad[0], size[1] + self._pad[1]))
            self.codec = "h264"
            log.info("writing %s: H.264 (%s through PyAV) at %g fps", self.path, encoder, fps)
            return writer
        writer = _OpenCVWriter(self._partial, self.path, self.fourccs, fps, size)
        self.codec = writer.fourcc
        log.info("writing %s: %s (OpenCV; %s) at %g fps", self.path, writer.fourcc,
                 "no H.264 encoder through PyAV" if self.output.target.suffix.lower() in H264_SUFFIXES
                 else f"no H.264 for {self.output.target.suffix}", fps)
        return writer

    def write(self, item: Rendered) -> None:
        self.write_image(item.overlay, source_fps=item.frame.info.fps)

    def write_image(self, image: np.ndarray, source_fps: float | None = None) -> None:
        """Append one H×W×3 uint8 BGR image; ``source_fps`` sets the rate if the first frame (see the
        class docstring)."""
        if self._broken:
            raise SinkError(f"cannot write {self.path}: an earlier frame failed")
        with sink_errors():
            require_space(self.output.target.parent, self._room_needed(), name=self.path, exit_code=EXIT_FAILURE)
        if self._writer is None:
            self._size = (image.shape[1], image.shape[0])
            self.fps = self.fps or (source_fps if source_fps and source_fps > 0 else self.default_fps)
            self._writer = self._open(self._size, self.fps)
        if (image.shape[1], image.shape[0]) != self._size:
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
        if any(self._pad):
            image = cv2.copyMakeBorder(image, 0, self._pad[1], 0, self._pad[0], cv2.BORDER_REPLICATE)
        try:
            self._writer.write(np.ascontiguousarray(image))
        except self._writer.failures as exc:
            self._broken = True  # the encoder's state is unknown: the file cannot be finished
            raise SinkError(str(write_error(self.output, exc)), EXIT_FAILURE) from exc
        self.frames += 1

    def _room_needed(self) -> int:
        """Bytes to keep free before the next frame: the index for every frame, plus twice the largest
        step the file has grown by so far (a key frame or fragment, or the encoder's buffer written out)."""
        if self._writer is not None:
            try:
                size = os.stat(self._partial).st_size
            except FileNotFoundError:  # PyAV creates the file with its first packet
                size = 0
            self._largest_step = max(self._largest_step, size - self._bytes)
            self._bytes = size
        return INDEX_BYTES_PER_FRAME * (self.frames + 1) + 2 * self._largest_step

    def close(self) -> None:
        """Finish the file: release the writer, check it reads back, rename it into place; with no
        frame written, or after a failed write, leave nothing. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is None:
            return
        try:
            self._writer.release()
        except self._writer.failures as exc:
            discard(self.output)
            if not self._broken:
                raise SinkError(str(write_error(self.output, exc)), EXIT_FAILURE) from exc
            return
        if not self.frames or self._broken:
            discard(self.output)
            return
        with sink_errors():
            commit(self.output, verify=self._reads_back)

    def _reads_back(self, partial: Path) -> str | None:
        """What is wrong with the finished temporary file, or None: it opens, holds every frame, and
        its last frame decodes."""
        return _h264_problem(partial, self.frames) if self.codec == "h264" else _opencv_problem(partial, self.frames)


def _h264_problem(path: Path, frames: int) -> str | None:
    """Why the video PyAV wrote at ``path`` is not ``frames`` frames whose last decodes, or None. Only the
    packets from the last key frame on are decoded, so checking a long video takes milliseconds."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            count, tail = 0, []
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end marker
                    continue
                count += 1
                if packet.is_keyframe:
                    tail = []
                tail.append(packet)
            if count != frames:
                return f"{count} of {frames} frames can be read back"
            decoded = sum(len(stream.decode(packet)) for packet in tail) + len(stream.decode(None))
            return None if decoded == len(tail) else "its last frames cannot be decoded"
    except (av.FFmpegError, OSError, IndexError) as exc:
        return f"the finished video cannot be read back ({exc})"


def _opencv_problem(path: Path, frames: int) -> str | None:
    """The same check for a video OpenCV wrote: it opens, declares every frame, its last decodes."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return "the finished video cannot be read back"
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if count != frames:
            return f"{count} of {frames} frames can be read back"
        capture.set(cv2.CAP_PROP_POS_FRAMES, count - 1)
        if not capture.read()[0]:
            return "its last frame cannot be decoded"
        return None
    finally:
        capture.release()


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> VideoSink:
    return VideoSink(path, default_fps=output.video_fps)


SPEC = SinkSpec("video", "--out", "FILE.mp4",
                "write the overlay video (.mp4, .m4v, .mov, .avi or .mkv; H.264 at the source's frame rate)",
                _open, "bench.mp4", suffixes=VIDEO_SUFFIXES)
