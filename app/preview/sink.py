"""The browser preview's end of the pipeline: a sink that keeps the newest overlay for the viewers.

:class:`PreviewSink` has the sink shape (``write(Rendered)``, ``close()``) and runs in the sinks stage.
``write`` only keeps a reference to the newest item and books its arrival (plus, while the page's record
button is on, one frame of the MP4 recording), so viewers can never make the pipeline wait: they call
:meth:`PreviewSink.next_jpeg` from their own threads, which encodes the newest overlay at most
``preview.max_fps`` times a second, once for all viewers.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from app.errors import first_line
from app.pipeline.sinks import Rendered, Sink, SinkError, video
from app.pipeline.stats import fps_over

if TYPE_CHECKING:
    from app.config import OutputConfig, PreviewConfig

log = logging.getLogger(__name__)

POLL_S = 0.05
"""How often a waiting viewer checks the stop event (seconds)."""
RECENT_FRAMES = 30
"""Frames the fps and latency on the page are averaged over."""


class PreviewSink:
    """Newest overlay, live statistics and the recording of a run, for :mod:`app.preview.server`.

    ``class_names`` and ``palette`` (RGB per class) label the class fractions; ``output`` is handed to
    the MP4 sink (:data:`app.pipeline.sinks.video.SPEC`) for recordings, written under
    ``settings.record_dir``. ``on_close`` runs last in :meth:`close` (the server shutting down).
    The statistics' ``frames_dropped`` counts the frame indices that never reached the sink (dropped on
    the way, or unreadable files skipped). Thread-safe: ``write``/``close`` from the sinks stage, the rest from the
    server's threads.
    """

    def __init__(self, settings: PreviewConfig, output: OutputConfig, class_names: Sequence[str],
                 palette: Sequence[Sequence[int]] | None = None, *, url: str = "",
                 on_close: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.output = output
        self.class_names = list(class_names)
        self.palette = [list(map(int, color)) for color in palette] if palette is not None else None
        self.path = url or "browser preview"  # what messages name this sink by
        self._on_close = on_close
        self._interval_s = 1.0 / settings.max_fps
        self._changed = threading.Condition()  # guards everything below, up to the recording
        self._newest: Rendered | None = None
        self._seq = 0
        self._received = 0
        self._arrivals: deque[float] = deque(maxlen=RECENT_FRAMES)
        self._latencies: deque[float] = deque(maxlen=RECENT_FRAMES)
        self._jpeg = b""
        self._jpeg_seq = 0
        self._encoded_at = -float("inf")
        self._encode = threading.Lock()  # one encoder at a time; the others take its result
        self._record = threading.Lock()  # guards the recording
        self._recorder: Sink | None = None
        self._recording_path = ""
        self._recorded = 0
        self._last_saved = ""
        self._record_error = ""
        self._closed = False

    # -- the pipeline's side ------------------------------------------------------------------------------
    def write(self, item: Rendered) -> None:
        """Keep ``item`` as the newest frame (a reference, no copy) and record it when recording."""
        now = time.perf_counter()
        with self._changed:
            self._newest = item
            self._seq += 1
            self._received += 1
            self._arrivals.append(now)
            self._latencies.append(item.latency_ms)
            self._changed.notify_all()
        if self._recorder is None:
            return
        with self._record:
            if self._recorder is None:
                return
            try:
                self._recorder.write(item)
                self._recorded += 1
            except SinkError as exc:  # the live run goes on; the page shows why the recording stopped
                self._record_error = first_line(exc)
                log.warning("recording stopped: %s", self._record_error)
                failed, self._recorder = self._recorder, None
                try:  # keeps the frames written so far as a playable file when it can
                    failed.close()
                except SinkError:
                    return
                self._saved(failed)

    def close(self) -> None:
        """Finish a recording in progress, then run ``on_close``. Idempotent; raises the recording's
        SinkError, if finishing it failed, after ``on_close`` has run."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        try:
            with self._record:
                recorder, self._recorder = self._recorder, None
            if recorder is not None:
                recorder.close()
                self._saved(recorder)
        finally:
            self._on_close()

    # -- the viewers' side --------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def next_jpeg(self, after: int, stop: threading.Event, timeout_s: float = float("inf")) -> tuple[int, bytes] | None:
        """``(number, JPEG bytes)`` of the newest overlay once one newer than frame number ``after`` can
        be sent (waiting for it); None once ``stop`` is set, the sink is closed or ``timeout_s`` passed.
        At most one encode per ``1 / max_fps`` seconds for all callers together."""
        deadline = time.perf_counter() + timeout_s
        while not stop.is_set() and time.perf_counter() < deadline:
            with self._changed:
                if self._closed:
                    return None
                if self._jpeg_seq > after:
                    return self._jpeg_seq, self._jpeg
                if self._seq <= after:
                    self._changed.wait(POLL_S)
                    continue
                wait_s = self._encoded_at + self._interval_s - time.perf_counter()
            if wait_s > 0:
                stop.wait(min(wait_s, POLL_S))
                continue
            with self._encode:
                with self._changed:
                    if self._jpeg_seq > after:  # another viewer encoded it meanwhile
                        return self._jpeg_seq, self._jpeg
                    seq, item = self._seq, self._newest
                assert item is not None
                ok, buffer = cv2.imencode(".jpg", item.overlay, [cv2.IMWRITE_JPEG_QUALITY, self.settings.jpeg_quality])
                if not ok:
                    raise RuntimeError("OpenCV could not encode the overlay as JPEG")
                jpeg = buffer.tobytes()
                with self._changed:
                    self._jpeg, self._jpeg_seq, self._encoded_at = jpeg, seq, time.perf_counter()
                return seq, jpeg
        return None

    def stats(self) -> dict[str, Any]:
        """What the page shows: frames received, fps and mean latency over the last
        :data:`RECENT_FRAMES`, frames dropped, class fractions of the newest frame, the recording."""
        with self._changed:
            item, received, closed = self._newest, self._received, self._closed
            fps = fps_over(self._arrivals[0], self._arrivals[-1], len(self._arrivals)) if self._arrivals else 0.0
            latency = float(np.mean(self._latencies)) if self._latencies else None
        stats: dict[str, Any] = {"frames": received, "fps": fps, "latency_ms": latency, "frames_dropped": 0,
                                 "frame_index": None, "size": None, "source": None, "classes": [],
                                 "ended": closed, "recording": self.recording()}
        if item is None:
            return stats
        counts = np.bincount(item.labels.ravel(), minlength=len(self.class_names))[:len(self.class_names)]
        stats.update(frames_dropped=item.frame.index + 1 - received, frame_index=item.frame.index,
                     size=[int(item.overlay.shape[1]), int(item.overlay.shape[0])], source=item.frame.info.uri,
                     classes=[{"name": name, "fraction": float(count) / item.labels.size,
                               "color": self.palette[index] if self.palette and index < len(self.palette) else None}
                              for index, (name, count) in enumerate(zip(self.class_names, counts.tolist(), strict=True))])
        return stats

    # -- the record button ----------------------------------------------------------------------------------
    def recording(self) -> dict[str, Any]:
        """``active``, the ``file`` being written and its ``frames``, the ``last_saved`` file, ``error``."""
        with self._record:
            return self._recording_state()

    def start_recording(self) -> dict[str, Any]:
        """Start writing every frame to a new MP4 in ``record_dir`` (nothing if one is being written);
        returns :meth:`recording`. Raises SinkError (one line) when the file cannot be created."""
        with self._record:
            if self._recorder is not None or self._closed:
                return self._recording_state()
        path = self._new_path()
        recorder = video.SPEC.open(path, self.output, self.class_names)
        with self._record:
            if self._recorder is None and not self._closed:
                self._recorder, recorder = recorder, None
                self._recording_path, self._recorded, self._record_error = str(path), 0, ""
        if recorder is not None:  # a second click won the race, or the run ended: this one stays empty
            recorder.close()
        log.info("recording %s", self._recording_path)
        return self.recording()

    def stop_recording(self) -> dict[str, Any]:
        """Finish the recording (renamed into place, playable) and return :meth:`recording`. Raises
        SinkError when finishing it failed."""
        with self._record:
            recorder, self._recorder = self._recorder, None
        if recorder is not None:
            self._finish(recorder)
        return self.recording()

    def _finish(self, recorder: Sink) -> None:
        try:
            recorder.close()
        except SinkError as exc:
            self._record_error = first_line(exc)
            raise
        self._saved(recorder)

    def _saved(self, recorder: Sink) -> None:
        if Path(recorder.path).exists():
            self._last_saved = str(recorder.path)
            log.info("recorded %s (%d frames)", recorder.path, self._recorded)

    def _recording_state(self) -> dict[str, Any]:
        return {"active": self._recorder is not None, "file": self._recording_path if self._recorder else None,
                "frames": self._recorded, "last_saved": self._last_saved or None,
                "error": self._record_error or None}

    def _new_path(self) -> Path:
        """``record_dir/preview_YYYYmmdd-HHMMSS.mp4``, with ``_2``, ``_3`` … when that file exists."""
        folder = Path(self.settings.record_dir)
        stem = f"preview_{datetime.datetime.now():%Y%m%d-%H%M%S}"
        path, number = folder / f"{stem}.mp4", 1
        while path.exists():
            number += 1
            path = folder / f"{stem}_{number}.mp4"
        return path
