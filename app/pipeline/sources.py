"""Frame sources: cameras, video files, network streams, image sequences and the synthetic generator.

Every source yields :class:`Frame` objects (``index``, ``timestamp`` = capture time in
``time.perf_counter`` seconds, ``image`` = H×W gray or H×W×3 BGR, uint8 or uint16, and ``info``) from
``read(stop)``, which blocks until a frame is ready and returns the :data:`END_OF_STREAM` marker at the
end (and once ``stop`` is set). End of stream is decided by a failed read, never by a container's frame
count. ``open_source(uri, config)`` picks the class from the URI:

=====================================  =========================  ==================================
URI                                    class                      policy
=====================================  =========================  ==================================
``synthetic``                          :class:`SyntheticSource`   live: paced at ``source.fps``
``0``, ``camera0``, ``/dev/video0``    :class:`CameraSource`      live
``rtsp://…``, ``http(s)://…``, …       :class:`StreamSource`      live, reconnects with backoff
folder, glob (``dir/*.png``), image    :class:`ImageSequenceSource`  file: prefetched, in order
``stack.tif``, ``run.ome.tiff``        :class:`TiffStackSource`   file: pages prefetched, in order
any other file                         :class:`VideoFileSource`   file
=====================================  =========================  ==================================

``info.live`` tells the pipeline which policy applies: a live source keeps only the newest frames when
downstream is slower (drops are counted), a file source is read only as fast as it is consumed, so no
frame is ever lost. A bare digit string is always a camera index, never a file name. Errors (missing
file, unknown scheme, camera that does not open within ``source.open_timeout_s``) raise
:class:`SourceError` with a one-line message. Sources are used from one thread at a time; ``close()``
is idempotent and sources are context managers.
"""

from __future__ import annotations

import glob
import logging
import math
import queue
import re
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

import cv2
import numpy as np

from app.errors import AppError
from app.pipeline.frames import END_OF_STREAM, IMAGE_SUFFIXES, EndOfStream, Frame, SourceInfo
from app.pipeline.queues import POLL_S, put_dropping_oldest

if TYPE_CHECKING:
    from app.config import Config, SourceConfig, SynthConfig

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")


class SourceError(AppError, RuntimeError):
    """A source cannot be opened or stopped delivering frames (message is one line for the user)."""


class Source:
    """Base class: ``read(stop) -> Frame | END_OF_STREAM``, ``close()``, iteration, counters.

    Counters: ``frames_read`` (delivered), ``frames_skipped`` (unreadable files), ``frames_dropped``
    (frames a live source discarded itself because nobody read them in time), ``reconnects``.
    """

    info: SourceInfo

    def __init__(self) -> None:
        self.frames_read = 0
        self.frames_skipped = 0
        self.frames_dropped = 0
        self.reconnects = 0
        self._closed = False

    @property
    def live(self) -> bool:
        return self.info.live

    def read(self, stop: threading.Event | None = None) -> Frame | EndOfStream:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True

    def counters(self) -> dict[str, int]:
        return {"frames_read": self.frames_read, "frames_skipped": self.frames_skipped,
                "frames_dropped": self.frames_dropped, "reconnects": self.reconnects}

    def _frame(self, index: int, image: np.ndarray, timestamp: float | None = None,
               name: str | None = None) -> Frame:
        self.frames_read += 1
        return Frame(index, time.perf_counter() if timestamp is None else timestamp, image, self.info,
                     name=name)

    def __iter__(self) -> Iterator[Frame]:
        while True:
            item = self.read()
            if isinstance(item, EndOfStream):
                return
            yield item

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def natural_key(path: str | Path) -> list[Any]:
    """Sort key that orders embedded numbers by value: frame2 before frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(path))]


def _call_with_timeout(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Run a possibly hanging call (opening a device or URL) in a daemon thread; give up after timeout.

    A call that never returns is abandoned (its daemon thread cannot block interpreter exit).
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"open {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise SourceError(f"{what} did not open within {timeout_s:g} s")
    if "error" in box:
        raise SourceError(f"{what} could not be opened: {box['error']}") from box["error"]
    return box["value"]


class _CaptureSource(Source):
    """A live cv2.VideoCapture read by a daemon thread into a 2-slot newest-frame buffer.

    The device is opened by the constructor (so a bad one fails at once); the reader thread starts at
    the first ``read``, so no frame is captured and dropped while the rest of the pipeline is set up.
    Reading in a thread means a stalled device or network never blocks ``read(stop)``, which polls the
    buffer and checks ``stop``. A failed read triggers up to ``reconnect_attempts`` reconnects with
    exponential backoff (``reconnect_backoff_s`` doubling); a success resets the attempt count. When
    the attempts are spent, or nothing at all happens for longer than the open plus read timeouts,
    ``read`` raises :class:`SourceError`.
    """

    def __init__(self, info: SourceInfo, what: str, open_capture: Callable[[], cv2.VideoCapture],
                 settings: SourceConfig, reconnect_attempts: int) -> None:
        super().__init__()
        self.info = info
        self._what = what
        self._open_capture = open_capture
        self._settings = settings
        self._reconnect_attempts = reconnect_attempts
        self._buffer: queue.Queue[Frame] = queue.Queue(maxsize=2)
        self._halt = threading.Event()
        self._error: SourceError | None = None
        self._index = 0
        self._capture: cv2.VideoCapture | None = self._open()
        self._ends_at_read_failure = False  # True for a finite recording: a failed read is its end
        self._last_activity = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(self._capture,), name=f"read {what}",
                                        daemon=True)

    #: Extra wait beyond ``open_timeout_s`` before an open call is abandoned, for backends that enforce
    #: the timeout themselves: they return cleanly first. An abandoned call that returns while the
    #: interpreter exits aborts the process ("terminate called without an active exception").
    open_grace_s = 0.0
    open_failure_hint = "does it exist?"

    def _open(self) -> cv2.VideoCapture:
        capture = _call_with_timeout(self._open_capture, self._settings.open_timeout_s + self.open_grace_s,
                                     self._what)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"{self._what} could not be opened ({self.open_failure_hint})")
        return capture

    def _run(self, capture: cv2.VideoCapture | None) -> None:
        attempts = 0
        try:
            while not self._halt.is_set():
                if capture is None:
                    if attempts >= self._reconnect_attempts:
                        self._error = SourceError(
                            f"{self._what} stopped delivering frames"
                            + (f" (gave up after {attempts} reconnect attempts)" if attempts else ""))
                        return
                    attempts += 1
                    delay = self._settings.reconnect_backoff_s * 2 ** (attempts - 1)
                    # A deliberate backoff is activity, not a stall.
                    self._last_activity = time.perf_counter() + delay
                    if self._halt.wait(delay):
                        return
                    self.reconnects += 1
                    try:
                        capture = self._open()
                    except SourceError as exc:
                        log.warning("%s: reconnect %d/%d failed: %s", self._what, attempts,
                                    self._reconnect_attempts, exc)
                        capture = None
                        continue
                    log.info("%s: reconnected", self._what)
                ok, image = capture.read()
                self._last_activity = time.perf_counter()
                if not ok or image is None:
                    capture.release()
                    capture = None
                    if self._ends_at_read_failure and self._index > 0:
                        return  # end of the recording: read() reports END_OF_STREAM once drained
                    continue
                attempts = 0
                self._push(self._frame(self._index, image, self._last_activity))
                self._index += 1
        finally:
            if capture is not None:
                capture.release()

    def _push(self, frame: Frame) -> None:
        self.frames_dropped += put_dropping_oldest(self._buffer, frame)

    def read(self, stop: threading.Event | None = None) -> Frame | EndOfStream:
        stall_limit = self._settings.open_timeout_s + self._settings.read_timeout_s + 1.0
        if self._capture is not None and not self._closed:
            self._capture = None  # the reader thread owns it from now on
            self._last_activity = time.perf_counter()
            self._thread.start()
        while True:
            if (stop is not None and stop.is_set()) or self._closed:
                return END_OF_STREAM
            try:
                return self._buffer.get(timeout=POLL_S)
            except queue.Empty:
                pass
            if self._error is not None:
                raise self._error
            if not self._thread.is_alive():
                try:  # a last frame pushed just before the reader ended
                    return self._buffer.get_nowait()
                except queue.Empty:
                    return END_OF_STREAM
            if time.perf_counter() - self._last_activity > stall_limit:
                raise SourceError(f"{self._what}: no response for {stall_limit:g} s")

    def close(self) -> None:
        super().close()
        self._halt.set()
        if self._capture is not None:  # never read: the reader thread was not started
            self._capture.release()
            self._capture = None
        elif self._thread.ident is not None:
            self._thread.join(timeout=0.5)


class CameraSource(_CaptureSource):
    """A local camera by index (V4L2 on Linux). Live; a read failure is an error (no reconnects)."""

    def __init__(self, index: int, settings: SourceConfig, uri: str | None = None) -> None:
        api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
        info = SourceInfo(uri or f"camera{index}", "camera", live=True)
        super().__init__(info, f"camera {index}", lambda: cv2.VideoCapture(index, api), settings,
                         reconnect_attempts=0)


class StreamSource(_CaptureSource):
    """A network stream (rtsp://, http://, …) through FFmpeg with open/read timeouts. Live.

    A lost connection is retried ``source.reconnect_attempts`` times with exponential backoff;
    ``reconnects`` counts the attempts. A recording served over the network (a container that
    declares its frame count, e.g. ``http://host/run.mp4``) instead ends at its first failed read, as a
    video file does; live streams (RTSP, MJPEG, HLS) declare none.
    """

    open_grace_s = 1.0
    open_failure_hint = "unreachable, refused, or no answer within source.open_timeout_s"

    def __init__(self, url: str, settings: SourceConfig) -> None:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(settings.open_timeout_s * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(settings.read_timeout_s * 1000)]
        info = SourceInfo(url, "stream", live=True)
        super().__init__(info, f"stream {url}", lambda: cv2.VideoCapture(url, cv2.CAP_FFMPEG, params),
                         settings, reconnect_attempts=settings.reconnect_attempts)
        declared = self._capture.get(cv2.CAP_PROP_FRAME_COUNT)  # live streams: 0 or a negative sentinel
        self._ends_at_read_failure = 0 < declared < 2**31


class VideoFileSource(Source):
    """Any container OpenCV/FFmpeg can decode. File policy; ends at the first failed read.

    With ``loop`` the file is reopened at its end. The container's frame count is only a progress hint;
    a file that ends before it (a truncated recording) is reported once with a warning.
    """

    def __init__(self, path: str | Path, loop: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.loop = loop
        self._capture = self._open()
        count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = float(self._capture.get(cv2.CAP_PROP_FPS))
        self.info = SourceInfo(str(self.path), "video", live=False, fps=fps if fps > 0 else None,
                               frame_count=count if count > 0 and not loop else None)
        self._declared = max(count, 0)
        self._warned_short = False
        self._index = 0
        self._read_this_pass = 0

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            raise SourceError(f"cannot open video file {self.path} (not a video OpenCV can decode?)")
        return capture

    def read(self, stop: threading.Event | None = None) -> Frame | EndOfStream:
        if self._closed or (stop is not None and stop.is_set()):
            return END_OF_STREAM
        ok, image = self._capture.read()
        if not ok or image is None:
            if self._index == 0:
                raise SourceError(f"cannot decode any frame from {self.path}")
            if self._read_this_pass < self._declared and not self._warned_short:
                self._warned_short = True
                log.warning("%s: video ended after %d of %d frames declared", self.path,
                            self._read_this_pass, self._declared)
            if not (self.loop and self._read_this_pass):
                return END_OF_STREAM
            self._capture.release()
            self._capture = self._open()
            self._read_this_pass = 0
            return self.read(stop)
        self._read_this_pass += 1
        frame = self._frame(self._index, image)
        self._index += 1
        return frame

    def close(self) -> None:
        super().close()
        self._capture.release()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_damage(data: bytes) -> str | None:
    """Why ``data`` is not an intact PNG file, or None: no signature, no IHDR chunk first, a chunk cut
    short or failing its CRC, or no IEND chunk. Checking before decoding keeps libpng from printing its
    own ``libpng error: …`` line on stderr (it bypasses OpenCV's log level) next to our skip warning."""
    if not data.startswith(PNG_SIGNATURE):
        return "no PNG signature"
    view, position = memoryview(data), len(PNG_SIGNATURE)
    while position + 12 <= len(data):
        length = int.from_bytes(view[position:position + 4], "big")
        end = position + 12 + length
        kind = bytes(view[position + 4:position + 8]).decode("latin-1")
        if not (kind.isascii() and kind.isalpha()):
            return "damaged chunk header"
        if position == len(PNG_SIGNATURE) and kind != "IHDR":
            return "no IHDR chunk after the signature"
        if end > len(data):
            return f"{kind} chunk cut short"
        if zlib.crc32(view[position + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return f"{kind} chunk fails its CRC"
        if kind == "IEND":
            return None
        position = end
    return "cut short before the IEND chunk"


def _read_image(path: Path) -> np.ndarray:
    """Decode an image file unchanged (8/16-bit, gray or BGR); raise ``ValueError`` naming why it cannot
    be (a damaged PNG is caught before libpng sees it), ``OSError`` if it cannot be read."""
    data = path.read_bytes()
    damage = png_damage(data) if path.suffix.lower() == ".png" else None
    if damage:
        raise ValueError(damage)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if image is None:
        raise ValueError("empty file" if not data else "corrupt or not an image")
    return image


class _PrefetchSource(Source):
    """Frames at positions ``0 … count-1`` decoded ahead by reader threads and delivered in order. File policy.

    ``prefetch_threads`` reader threads keep up to ``prefetch_depth`` frames decoded ahead. A frame's
    ``index`` is its position (plus ``count`` per completed pass with ``loop``). An unreadable frame is
    skipped with a one-line warning and counted in ``frames_skipped``, leaving a gap in the indices, so
    the frames after it keep theirs; with ``strict`` it raises :class:`SourceError`. Subclasses say how
    to decode a position (:meth:`_load`, raising ``OSError``/``ValueError``), what it is called in
    messages (:meth:`_what`) and its frame name (:meth:`_name`).
    """

    _wait_on_close = False
    """Whether ``close`` waits for the reads already running (when it closes their file next)."""

    def __init__(self, count: int, prefetch_threads: int, prefetch_depth: int, strict: bool, loop: bool) -> None:
        super().__init__()
        self.count = count
        self.strict = strict
        self.loop = loop
        self._executor = ThreadPoolExecutor(max_workers=max(1, prefetch_threads), thread_name_prefix="prefetch")
        self._depth = max(1, prefetch_depth)
        self._pending: deque[tuple[int, int, Future[np.ndarray]]] = deque()
        self._next_position = 0
        self._passes = 0
        self._delivered_this_pass = 0

    def _load(self, position: int) -> np.ndarray:
        raise NotImplementedError

    def _what(self, position: int) -> str:
        raise NotImplementedError

    def _name(self, position: int) -> str:
        raise NotImplementedError

    def _fill(self) -> None:
        while len(self._pending) < self._depth:
            if self._next_position >= self.count:
                if not (self.loop and self._delivered_this_pass):
                    return
                self._next_position = 0
                self._passes += 1
                self._delivered_this_pass = 0
            position = self._next_position
            self._next_position += 1
            self._pending.append((self._passes * self.count + position, position,
                                  self._executor.submit(self._load, position)))

    def read(self, stop: threading.Event | None = None) -> Frame | EndOfStream:
        while True:
            if self._closed or (stop is not None and stop.is_set()):
                return END_OF_STREAM
            self._fill()
            if not self._pending:
                return END_OF_STREAM
            index, position, future = self._pending[0]
            image, problem = None, ""
            while True:
                if stop is not None and stop.is_set():
                    return END_OF_STREAM
                try:
                    image = future.result(timeout=POLL_S)
                    break
                except FutureTimeout:
                    continue
                except (OSError, ValueError, cv2.error) as exc:  # all mean: this frame is unreadable
                    problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                    break
            self._pending.popleft()
            if image is None:
                if self.strict:
                    raise SourceError(f"cannot read {self._what(position)} ({problem})")
                self.frames_skipped += 1
                log.warning("skipping unreadable %s (%s)", self._what(position), problem)
                continue
            self._delivered_this_pass += 1
            return self._frame(index, image, name=self._name(position))

    def close(self) -> None:
        super().close()
        for _, _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=self._wait_on_close, cancel_futures=True)


class ImageSequenceSource(_PrefetchSource):
    """Numbered images (PNG/JPEG/TIFF/BMP, 8- or 16-bit, read unchanged) in natural order. File policy.

    Read ahead in parallel (see :class:`_PrefetchSource`). A frame's ``index`` is its file's position in
    ``paths`` (plus ``len(paths)`` per completed pass with ``loop``) and its ``name`` the file name. An
    unreadable file is skipped with a warning (or, with ``strict``, raises :class:`SourceError`).
    """

    def __init__(self, paths: list[Path], uri: str, prefetch_threads: int = 4, prefetch_depth: int = 16,
                 strict: bool = False, loop: bool = False) -> None:
        if not paths:
            raise SourceError(f"no images (png/jpg/tif/bmp) found in {uri}")
        super().__init__(len(paths), prefetch_threads, prefetch_depth, strict, loop)
        self.paths = paths
        self.info = SourceInfo(uri, "images", live=False, frame_count=None if loop else len(paths))

    def _load(self, position: int) -> np.ndarray:
        return _read_image(self.paths[position])

    def _what(self, position: int) -> str:
        return f"image {self.paths[position]}"

    def _name(self, position: int) -> str:
        return self.paths[position].name


_LENGTH_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "um": 1.0, "\u00b5m": 1.0, "\u03bcm": 1.0, r"\u00B5m": 1.0,
              "micron": 1.0, "microns": 1.0, "nm": 1e-3, "\u00c5": 1e-4}
"""µm per unit of length, for OME units and ImageJ's (which may spell µ as the escape ``\\u00B5``)."""
_TIME_S = {"s": 1.0, "ms": 1e-3, "\u00b5s": 1e-6, "us": 1e-6, "min": 60.0, "h": 3600.0}
_RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre


def _positive(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) and value > 0 else None


def _ome_pixels(tif: Any) -> dict[str, str]:
    """The attributes of the first OME ``Pixels`` element (namespace ignored), {} if unreadable."""
    try:
        root = ElementTree.fromstring(tif.ome_metadata)
    except ElementTree.ParseError:
        return {}
    pixels = next((element for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    return dict(pixels.attrib) if pixels is not None else {}


def _scaled(value: str | float | None, unit: str, table: Mapping[str, float]) -> float | None:
    try:
        return _positive(float(value) * table[unit.strip()]) if value is not None else None
    except (KeyError, ValueError):
        return None


def tiff_pixel_size_um(tif: Any) -> float | None:
    """µm per pixel from a TIFF's metadata: OME ``PhysicalSizeX`` (+ unit, µm by default), else the
    XResolution tag in ImageJ's unit or the ResolutionUnit (inch, cm); None when it says nothing."""
    if tif.is_ome:
        pixels = _ome_pixels(tif)
        size = _scaled(pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "\u00b5m"), _LENGTH_UM)
        if size is not None:
            return size
    page = tif.pages[0]
    resolution = page.tags.get("XResolution")
    if resolution is None:
        return None
    numerator, denominator = resolution.value
    if not numerator or not denominator:
        return None
    per_unit = numerator / denominator  # pixels per unit length
    unit = page.tags.get("ResolutionUnit")
    unit_um = _RESOLUTION_UNIT_UM.get(int(unit.value) if unit is not None else 2)
    if unit_um is None and tif.is_imagej:
        unit_um = _LENGTH_UM.get(str((tif.imagej_metadata or {}).get("unit", "")).strip())
    return _positive(unit_um / per_unit) if unit_um else None


def tiff_fps(tif: Any) -> float | None:
    """Frames per second from OME ``TimeIncrement`` or ImageJ ``finterval``/``fps``; None when absent."""
    if tif.is_ome:
        pixels = _ome_pixels(tif)
        interval = _scaled(pixels.get("TimeIncrement"), pixels.get("TimeIncrementUnit", "s"), _TIME_S)
        if interval is not None:
            return 1.0 / interval
    if tif.is_imagej:
        metadata = tif.imagej_metadata or {}
        interval = _scaled(metadata.get("finterval"), "s", _TIME_S)
        if interval is not None:
            return 1.0 / interval
        return _scaled(metadata.get("fps"), "s", _TIME_S)
    return None


def _page_image(page: Any) -> np.ndarray:
    """One TIFF page as a frame: H×W gray or H×W×3 BGR, dtype unchanged; ``ValueError`` when it cannot be
    decoded (tifffile and its codecs raise many kinds of error for a damaged page)."""
    try:
        image = page.asarray()
    except Exception as exc:  # noqa: BLE001 - any decoder failure means: this page is unreadable
        raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    if image.ndim == 3 and page.planarconfig == 2:  # separate planes: samples first
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR if image.shape[-1] == 3
                            else cv2.COLOR_RGBA2BGR)
    if image.ndim != 2:
        raise ValueError(f"a page of shape {image.shape} is not a gray or RGB image")
    return image


class TiffStackSource(_PrefetchSource):
    """The pages of a (multi-page, OME-) TIFF, read page by page through tifffile, as a sequence. File policy.

    The pages of the file's first series (all pages of a plain stack; the images of an OME-TIFF) are
    frames in file order, 8- or 16-bit unchanged, RGB turned into BGR; read ahead like an image sequence
    (see :class:`_PrefetchSource`). Page k is named ``<stem>_p<k>`` (``stack_p000``…, wider when the
    stack has over 1000 pages); a single-page TIFF keeps its file name, as in an image sequence.
    ``info.pixel_size_um`` and ``info.fps`` come from the metadata (:func:`tiff_pixel_size_um`,
    :func:`tiff_fps`). A damaged page is skipped with a warning (or, with ``strict``, raises
    :class:`SourceError`); a file that is not a TIFF, or pages that are not 8/16-bit unsigned integers,
    raise :class:`SourceError` when opened.
    """

    _wait_on_close = True  # the file is closed next

    def __init__(self, path: str | Path, prefetch_threads: int = 4, prefetch_depth: int = 16,
                 strict: bool = False, loop: bool = False) -> None:
        import tifffile

        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
        except (OSError, ValueError, tifffile.TiffFileError) as exc:
            raise SourceError(f"cannot read TIFF {self.path} ({exc})") from exc
        try:
            series = self._tif.series
            pages = [page for page in series[0].pages if page is not None] if series else []
            if not pages:
                raise SourceError(f"TIFF {self.path} holds no image")
            dtype = np.dtype(pages[0].dtype)
            if dtype not in (np.uint8, np.uint16):
                raise SourceError(f"TIFF {self.path} has {dtype} pages; only 8- or 16-bit unsigned integer "
                                  f"images are read")
            self._tif.filehandle.set_lock(True)  # the reader threads share one file
            self.pixel_size_um = tiff_pixel_size_um(self._tif)
            fps = tiff_fps(self._tif)
        except BaseException:
            self._tif.close()
            raise
        self.pages = pages
        super().__init__(len(pages), prefetch_threads, prefetch_depth, strict, loop)
        self.info = SourceInfo(str(path), "tiff", live=False, fps=fps, frame_count=None if loop else len(pages),
                               pixel_size_um=self.pixel_size_um)
        stem = self.path.name.split(".", 1)[0] if ".ome." in self.path.name.lower() else self.path.stem
        self._stem, self._digits = stem, max(3, len(str(len(pages) - 1)))

    def _load(self, position: int) -> np.ndarray:
        return _page_image(self.pages[position])

    def _what(self, position: int) -> str:
        return f"page {position} of {self.path}"

    def _name(self, position: int) -> str:
        return self.path.name if self.count == 1 else f"{self._stem}_p{position:0{self._digits}d}"

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._tif.close()


class SyntheticSource(Source):
    """The interferogram generator of :mod:`app.synth`, behaving like a camera running at ``fps``.

    Frame ``k`` of the sequence is due at ``t0 + k / fps``. ``read`` waits for the next due frame;
    when called late it jumps to the newest due frame and counts the missed ones in ``frames_dropped``,
    as a camera would. ``fps <= 0`` (``paced=False``) delivers frames as fast as they are read with
    file semantics (used by replay). Ends after ``synth.frames`` frames unless ``loop``. ``info.fps`` is
    ``fps`` either way: the rate the sequence is meant to play at (e.g. in an MP4 of it).
    """

    def __init__(self, synth: SynthConfig, fps: float, loop: bool = False, paced: bool = True) -> None:
        from app.synthesis import make_sequence

        super().__init__()
        try:
            self.sequence = make_sequence(synth)
        except ValueError as exc:
            raise SourceError(f"synthetic source: {exc}") from exc
        self.fps = fps if paced else 0.0
        self.loop = loop
        live = self.fps > 0
        self.info = SourceInfo("synthetic", "synthetic", live=live, fps=fps if fps > 0 else None,
                               frame_count=None if loop else len(self.sequence))
        self._t0: float | None = None
        self._next = 0

    def read(self, stop: threading.Event | None = None) -> Frame | EndOfStream:
        if self._closed or (stop is not None and stop.is_set()):
            return END_OF_STREAM
        length = len(self.sequence)
        if self.fps > 0:
            now = time.perf_counter()
            if self._t0 is None:
                self._t0 = now
            due = int((now - self._t0) * self.fps)
            if due > self._next:
                missed = due - self._next if self.loop else min(due, length) - self._next
                self.frames_dropped += max(0, missed)
                self._next = due
            else:
                wait = self._t0 + self._next / self.fps - now
                if wait > 0:
                    waiter = stop if stop is not None else threading.Event()
                    if waiter.wait(wait):
                        return END_OF_STREAM
        if self._next >= length and not self.loop:
            return END_OF_STREAM
        index = self._next
        self._next += 1
        timestamp = time.perf_counter()
        synth_frame = self.sequence.frame(index % length)
        return self._frame(index, synth_frame.image, timestamp)


_CAMERA = re.compile(r"^(?:camera|/dev/video)?(\d+)$")


def _image_paths(pattern: str) -> list[Path]:
    return sorted((Path(p) for p in glob.glob(pattern) if Path(p).suffix.lower() in IMAGE_SUFFIXES
                   and Path(p).is_file()), key=natural_key)


def source_kind(uri: str) -> tuple[str, str]:
    """``(kind, target)`` for a source URI: kind is a :data:`SOURCES` name, target what it opens (camera
    index, URL, path or glob). Raises :class:`SourceError` for an unknown scheme or a missing path."""
    text = uri.strip()
    if not text:
        raise SourceError("empty source; give a camera, file, folder, glob, URL or synthetic")
    if text == "synthetic":
        return "synthetic", text
    if _CAMERA.match(text):
        return "camera", text
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in STREAM_SCHEMES:
        return "stream", text
    if scheme == "file":
        text = text[len("file://"):]
    elif scheme:
        raise SourceError(f"unknown source scheme '{scheme}://' in '{uri}'; use a camera (0, camera0, "
                          f"/dev/video0), a file, a folder, a glob, synthetic or one of "
                          f"{', '.join(s + '://' for s in STREAM_SCHEMES)}")
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() in TIFF_SUFFIXES:
        return "tiff", text
    if path.is_dir() or (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
        return "images", text
    if path.is_file():
        return "video", text
    if any(ch in text for ch in "*?["):
        return "images", text
    raise SourceError(f"no such file or folder: {uri}")


def _loader(settings: SourceConfig) -> dict[str, Any]:
    return {"prefetch_threads": settings.prefetch_threads, "prefetch_depth": settings.prefetch_depth,
            "strict": settings.strict, "loop": settings.loop}


def _open_synthetic(target: str, config: Config, realtime: bool) -> Source:
    return SyntheticSource(config.synth, config.source.fps, loop=config.source.loop, paced=realtime)


def _open_camera(target: str, config: Config, realtime: bool) -> Source:
    return CameraSource(int(_CAMERA.match(target).group(1)), config.source, uri=target)


def _open_stream(target: str, config: Config, realtime: bool) -> Source:
    return StreamSource(target, config.source)


def _frames_folder(folder: Path, config: Config) -> Path:
    """Where a folder's frames are: a dataset or app.synth folder (images/, masks/, background.png)
    keeps them in images/, which is used with a hint (and one to pass its background hologram)."""
    images = folder / "images"
    if not images.is_dir():
        return folder
    background = folder / "background.png"
    tip = (f"; add --background {background} to divide by its background hologram"
           if background.is_file() and not config.preprocess.background_file else "")
    log.info("%s: reading the frames in %s%s", folder, images, tip)
    return images


def _open_images(target: str, config: Config, realtime: bool) -> Source:
    path = Path(target).expanduser()
    if path.is_dir():
        paths = _image_paths(glob.escape(str(_frames_folder(path, config))) + "/*")
    elif path.is_file():
        paths = [path]
    else:
        paths = _image_paths(str(path))
        if not paths:
            raise SourceError(f"no images match '{target}'")
    if paths and paths[0].suffix.lower() in TIFF_SUFFIXES:
        if len(paths) == 1:  # a folder or glob of one stack
            return TiffStackSource(paths[0], **_loader(config.source))
        _warn_if_stack(paths[0])
    return ImageSequenceSource(paths, target, **_loader(config.source))


def _warn_if_stack(path: Path) -> None:
    """Say so when the first TIFF of a sequence has several pages: a sequence reads one page per file."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = len(tif.pages)
    except (OSError, ValueError, tifffile.TiffFileError):
        return  # the sequence reports it as unreadable
    if pages > 1:
        log.warning("%s has %d pages, but a folder or glob of TIFFs reads the first page of each; give one "
                    "stack's path to read its pages", path, pages)


def _open_tiff(target: str, config: Config, realtime: bool) -> Source:
    return TiffStackSource(Path(target).expanduser(), **_loader(config.source))


def _open_video(target: str, config: Config, realtime: bool) -> Source:
    return VideoFileSource(Path(target).expanduser(), loop=config.source.loop)


SourceOpener = Callable[[str, "Config", bool], Source]
SOURCES: Mapping[str, SourceOpener] = MappingProxyType({
    "synthetic": _open_synthetic,
    "camera": _open_camera,
    "stream": _open_stream,
    "images": _open_images,
    "tiff": _open_tiff,
    "video": _open_video,
})
"""Source kind -> ``open(target, config, realtime)``. A new source is one module (or class here) plus
one line here and its case in :func:`source_kind`."""
LIVE_KINDS = ("camera", "stream")


def open_source(uri: str, config: Config, *, realtime: bool = True) -> Source:
    """Open the source named by ``uri`` with ``config.source`` (and ``config.synth``) settings.

    ``realtime=False`` (replay) runs the synthetic source unpaced with file semantics and refuses
    cameras and streams. Raises :class:`SourceError` for an unknown scheme, a missing path, a folder or
    glob without images, or a device that does not open.
    """
    kind, target = source_kind(uri)
    if kind in LIVE_KINDS and not realtime:
        raise SourceError(f"'{uri}' is a live source; replay needs a recorded video, image folder or glob")
    return SOURCES[kind](target, config, realtime)
