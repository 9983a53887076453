"""The threaded pipeline that wires the stages, and the naive sequential loop it is compared with.

Stages, each in its own thread, joined by bounded queues of ``pipeline.queue_size``::

    source -> preprocess -> inference (batches) -> overlay -> sinks   (+ display, main thread)

Policies:

* A live source (camera, stream, paced synthetic) never waits: when the queue after the source or the
  one after preprocessing is full, the oldest frame in it is discarded and counted (``dropped`` of the
  ``source`` / ``preprocess`` stage). The queue in front of the model then holds only one batch, so
  stale frames cannot pile up there and latency stays at about one model call plus ``batch_size``
  source frame intervals. A file source blocks instead, so no frame is ever lost. Queues after
  inference always block (backpressure).
* The source delivers its first frame and then waits until the backend has warmed up on it: frames
  captured during the warm-up would only queue up and make the first latencies and the fps meaningless.
* End of stream is the :data:`~app.pipeline.sources.END_OF_STREAM` marker, forwarded by every stage.
* An exception in any stage sets the stop event; every queue operation waits at most 50 ms between
  checks of it, every join has a timeout, and :meth:`Pipeline.run` raises :class:`PipelineError`
  naming the stage and frame ("inference stage failed on frame 17: ...").
* Ctrl-C (KeyboardInterrupt in the main thread) or the display asking to quit stops all stages;
  sinks are closed (files finalised) in any case, and ``run`` returns with ``stopped`` saying why.

Python API (what the CLIs and the benchmark harness use)::

    stages = build_stages(config, realtime=True, num_classes=None)    # Stages(source, preprocessor, ...)
    result = Pipeline(stages.source, stages.preprocessor, stages.inference, stages.renderer,
                      stages.sinks, config.pipeline, display=None, progress=None).run()
    result = run_sequential(<same arguments>)                           # one frame at a time, no threads
    result.frames, result.fps, result.latency, result.stats["inference"]["p50_ms"], result.to_dict()

``preprocessor`` is any callable frame image -> float32 C×H×W (normally
:class:`app.pipeline.preprocess.Preprocessor`); ``inference`` an :class:`app.pipeline.inference.InferenceWorker`;
``renderer`` an :class:`app.pipeline.overlay.OverlayRenderer`; ``sinks`` objects with ``write(Rendered)`` and
``close()`` (:mod:`app.pipeline.sinks`). ``display`` (optional) has ``show(bgr_image) -> bool`` (False = quit)
and is called from the thread that calls ``run`` with the newest overlay; ``progress`` (optional) is
called there too, about ten times a second, as ``progress(frames_done, frames_expected_or_None, fps)``.
Timings exclude backend warm-up. Per-stage statistics (:mod:`app.pipeline.stats`) cover frames, fps,
mean/p50/p95 ms per frame, input-queue depth and drops.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from app.config import PipelineConfig
from app.errors import EXIT_FAILURE, EXIT_USAGE, AppError, first_line
from app.pipeline.cpu import affinity_plan
from app.pipeline.frames import END_OF_STREAM, EndOfStream, Frame
from app.pipeline.hologram import HologramError
from app.pipeline.inference import InferenceWorker, Stopped, collect_batch, queue_get
from app.pipeline.overlay import HudInfo, OverlayRenderer, picture_of
from app.pipeline.sinks import Rendered, Sink, close_all
from app.pipeline.sources import Source
from app.pipeline.stats import StageStats, fps_over, latency_summary

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    pass

STAGES = ("source", "preprocess", "inference", "overlay", "sinks")
_POLL_S = 0.05
_PROGRESS_INTERVAL_S = 0.1
_HUD_WINDOW = 30


class PipelineError(AppError, RuntimeError):
    """A stage failed; ``stage`` names it, ``frame_index`` is the frame it was working on (or None).

    Exit code 1 (a runtime failure), except when the cause is bad input only found on the first frame
    (a background hologram that does not fit the frames): 2.
    """

    def __init__(self, stage: str, frame_index: int | None, cause: BaseException | str) -> None:
        self.stage = stage
        self.frame_index = frame_index
        self.cause = cause if isinstance(cause, BaseException) else None
        if isinstance(cause, BaseException):  # the stage's error type says what failed: keep it
            text, name = first_line(cause), type(cause).__name__
            detail = name if text == name else f"{name}: {text}"
        else:
            detail = cause
        where = f" on frame {frame_index}" if frame_index is not None else ""
        super().__init__(f"{stage} stage failed{where}: {detail}")

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return EXIT_USAGE if isinstance(self.cause, HologramError) else EXIT_FAILURE


class Display(Protocol):
    def show(self, image: np.ndarray) -> bool: ...


Progress = Callable[[int, "int | None", float], None]


@dataclass
class PipelineResult:
    """Outcome of a run. ``fps`` is end to end: (N - 1) / (t_last - t_first) of frames leaving the sinks
    (the steady rate, what the HUD shows). ``throughput_fps`` is N / (t_last - t_start), t_start being
    when the first delivered frame was captured (or the backend finished warming up, if later): it also
    counts the time to fill the stages, so a short run with deep queues cannot look faster than it was;
    benchmarks compare runs with it.

    ``latency`` is capture -> written (ms: mean/p50/p95; frames captured during backend warm-up are
    left out); ``stopped`` is "end of stream",
    "max_frames", "user" (display quit) or "interrupted" (Ctrl-C); ``stats`` maps stage name to
    :meth:`app.pipeline.stats.StageStats.summary`.
    """

    mode: str
    frames: int
    fps: float
    wall_s: float
    latency: dict[str, float]
    frames_dropped: int
    frames_skipped: int
    reconnects: int
    stopped: str
    stats: dict[str, dict[str, Any]]
    source: dict[str, Any] = field(default_factory=dict)
    throughput_fps: float = 0.0

    @property
    def interrupted(self) -> bool:
        return self.stopped == "interrupted"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "frames": self.frames, "fps": self.fps,
                "throughput_fps": self.throughput_fps, "wall_s": self.wall_s,
                "latency": self.latency, "frames_dropped": self.frames_dropped,
                "frames_skipped": self.frames_skipped, "reconnects": self.reconnects,
                "stopped": self.stopped, "source": self.source, "stats": self.stats}


class _Output:
    """End-to-end bookkeeping of frames leaving the sinks (completion times, latencies).

    Frames captured before the backend finished warming up (``ready_at``) are left out of the latency
    figures: their wait is a one-off start-up cost, not the pipeline's latency.
    """

    def __init__(self) -> None:
        self.frames = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.latencies_ms: list[float] = []
        self.ready_at = 0.0
        self.first_capture: float | None = None

    def done(self, frame: Frame, t_done: float) -> None:
        if self.t_first is None:
            self.t_first = t_done
            self.first_capture = frame.timestamp
        self.t_last = t_done
        self.frames += 1
        if frame.timestamp >= self.ready_at:
            self.latencies_ms.append((t_done - frame.timestamp) * 1000.0)

    @property
    def fps(self) -> float:
        return fps_over(self.t_first, self.t_last, self.frames)

    @property
    def throughput_fps(self) -> float:
        if self.first_capture is None or self.t_last is None:
            return 0.0
        span = self.t_last - max(self.first_capture, self.ready_at)
        return self.frames / span if span > 0 else 0.0


class _RecentRate:
    """Frames per second over the last few completions (for the HUD)."""

    def __init__(self) -> None:
        self._times: deque[float] = deque(maxlen=_HUD_WINDOW)

    def tick(self, t: float) -> float:
        self._times.append(t)
        return fps_over(self._times[0], self._times[-1], len(self._times))


def _source_dict(source: Source) -> dict[str, Any]:
    info = source.info
    return {"uri": info.uri, "kind": info.kind, "live": info.live, **source.counters()}


def _result(mode: str, source: Source, output: _Output, stats: dict[str, StageStats], wall_s: float,
            stopped: str) -> PipelineResult:
    dropped = sum(s.frames_dropped for s in stats.values()) + source.frames_dropped
    summaries = {name: s.summary() for name, s in stats.items()}
    summaries["source"]["dropped"] += source.frames_dropped
    return PipelineResult(mode=mode, frames=output.frames, fps=output.fps, wall_s=wall_s,
                          latency=latency_summary(output.latencies_ms), frames_dropped=dropped,
                          frames_skipped=source.frames_skipped, reconnects=source.reconnects,
                          stopped=stopped, stats=summaries, source=_source_dict(source),
                          throughput_fps=output.throughput_fps)


class Pipeline:
    """Threaded pipeline over ready-made stages; :meth:`run` once. See the module docstring."""

    def __init__(self, source: Source, preprocessor: Callable[[np.ndarray], np.ndarray],
                 inference: InferenceWorker, renderer: OverlayRenderer, sinks: Sequence[Sink],
                 settings: PipelineConfig | None = None, *, display: Display | None = None,
                 progress: Progress | None = None) -> None:
        self.source = source
        self.preprocessor = preprocessor
        self.inference = inference
        self.renderer = renderer
        self.sinks = list(sinks)
        self.settings = settings or PipelineConfig()
        backend = inference.backend
        self._affinity = (affinity_plan(str(getattr(backend, "device", "")), getattr(backend, "threads", 0) or 0)
                          if self.settings.pin_threads else None)
        self.display = display
        self.progress = progress
        size = max(1, self.settings.queue_size)
        self._queues: dict[str, queue.Queue[Any]] = {name: queue.Queue(maxsize=size) for name in STAGES[1:]}
        if source.live:
            # Each frame waiting in front of the model adds a frame interval of latency: keep one batch.
            self._queues["inference"] = queue.Queue(maxsize=min(size, max(1, self.settings.batch_size)))
        self._display_queue: queue.Queue[np.ndarray] = queue.Queue(maxsize=1)
        self.stats = {name: StageStats(name) for name in STAGES}
        self._output = _Output()
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._warm = threading.Event()
        self._lock = threading.Lock()
        self._failure: PipelineError | None = None
        self._current: dict[str, int | None] = dict.fromkeys(STAGES)
        self._end_reason = "end of stream"
        self._ran = False

    # -- queue helpers -------------------------------------------------------------------------------
    def _put(self, target: queue.Queue[Any], item: Any) -> None:
        while True:
            if self._stop.is_set():
                raise Stopped
            try:
                target.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _put_newest(self, target: queue.Queue[Any], item: Any, stats: StageStats | None) -> None:
        """Live policy: never wait; discard the oldest queued item to make room (counted in ``stats``)."""
        while True:
            try:
                target.put_nowait(item)
                return
            except queue.Full:
                try:
                    target.get_nowait()
                    if stats is not None:
                        stats.frames_dropped += 1
                except queue.Empty:
                    pass

    def _get(self, name: str) -> Any:
        source = self._queues[name]
        self.stats[name].sample_queue(source.qsize())
        return queue_get(source, self._stop)

    def frames_dropped(self) -> int:
        """Frames dropped so far (queue drops plus drops inside the source); safe to call any time."""
        return sum(stats.frames_dropped for stats in self.stats.values()) + self.source.frames_dropped

    def _wait_until_warm(self) -> None:
        while not self._warm.wait(_POLL_S):
            if self._stop.is_set():
                raise Stopped

    # -- stages ---------------------------------------------------------------------------------------
    def _run_stage(self, name: str, body: Callable[[], None]) -> None:
        if self._affinity is not None:
            try:  # Linux: pid 0 is the calling thread; its own CPU set, not the process's
                os.sched_setaffinity(0, self._affinity["inference" if name == "inference" else "others"])
            except OSError:
                pass
        try:
            body()
        except Stopped:
            pass
        except BaseException as exc:
            self._fail(PipelineError(name, self._current[name], exc), exc)

    def _fail(self, error: PipelineError, cause: BaseException | None = None) -> None:
        with self._lock:
            if self._failure is None:
                error.__cause__ = cause
                self._failure = error
        self._stop.set()

    def _source_stage(self) -> None:
        stats = self.stats["source"]
        target = self._queues["preprocess"]
        live = self.source.live
        limit = self.settings.max_frames
        count = 0
        while True:
            if limit and count >= limit:
                self._end_reason = "max_frames"
                break
            self._current["source"] = None  # the next index is unknown until the read succeeds
            start = time.perf_counter()
            item = self.source.read(self._stop)
            if isinstance(item, EndOfStream):
                if self._stop.is_set():
                    raise Stopped
                break
            self._current["source"] = item.index
            stats.record(time.perf_counter() - start)
            count += 1
            if live:
                self._put_newest(target, item, stats)
            else:
                self._put(target, item)
            if count == 1:
                self._wait_until_warm()
        self._put(target, END_OF_STREAM)

    def _preprocess_stage(self) -> None:
        stats = self.stats["preprocess"]
        target = self._queues["inference"]
        live = self.source.live
        while True:
            frame = self._get("preprocess")
            if isinstance(frame, EndOfStream):
                break
            self._current["preprocess"] = frame.index
            start = time.perf_counter()
            tensor = self.preprocessor(frame.image)
            frame = with_display(frame, self.preprocessor, tensor, self.renderer.base)
            stats.record(time.perf_counter() - start)
            if live:
                self._put_newest(target, (frame, tensor), stats)
            else:
                self._put(target, (frame, tensor))
        self._put(target, END_OF_STREAM)

    def _inference_stage(self) -> None:
        stats = self.stats["inference"]
        source = self._queues["inference"]
        target = self._queues["overlay"]
        worker = self.inference
        while True:
            stats.sample_queue(source.qsize())
            items, ended = collect_batch(source, self._stop, worker.batch_size, worker.batch_timeout_ms,
                                         lambda item: isinstance(item, EndOfStream))
            if items:
                self._current["inference"] = items[0][0].index
                if worker.warmup(items[0][1].shape):
                    self._output.ready_at = time.perf_counter()
                self._warm.set()
                start = time.perf_counter()
                labels = worker.predict([tensor for _, tensor in items],
                                        [frame.image.shape[:2] for frame, _ in items])
                stats.record(time.perf_counter() - start, frames=len(items))
                for (frame, _), label_map in zip(items, labels, strict=True):
                    self._put(target, (frame, label_map))
            if ended:
                break
        self._put(target, END_OF_STREAM)

    def _overlay_stage(self) -> None:
        stats = self.stats["overlay"]
        target = self._queues["sinks"]
        rate = _RecentRate()
        while True:
            item = self._get("overlay")
            if isinstance(item, EndOfStream):
                break
            frame, labels = item
            self._current["overlay"] = frame.index
            start = time.perf_counter()
            hud = HudInfo(rate.tick(start), (start - frame.timestamp) * 1000.0, self.frames_dropped())
            picture = self.renderer.render(picture_of(frame, self.renderer.base), labels, hud)
            done = time.perf_counter()
            stats.record(done - start, t_done=done)
            self._put(target, Rendered(frame, labels, picture, (done - frame.timestamp) * 1000.0))
        self._put(target, END_OF_STREAM)

    def _sink_stage(self) -> None:
        stats = self.stats["sinks"]
        try:
            while True:
                item = self._get("sinks")
                if isinstance(item, EndOfStream):
                    break
                self._current["sinks"] = item.frame.index
                start = time.perf_counter()
                for sink in self.sinks:
                    sink.write(item)
                done = time.perf_counter()
                stats.record(done - start, t_done=done)
                self._output.done(item.frame, done)
                if self.display is not None:
                    self._put_newest(self._display_queue, item.overlay, None)
        finally:
            failure = close_all(self.sinks)
            if failure is not None:
                self._fail(PipelineError("sinks", None, failure), failure)
            self._finished.set()

    # -- main thread ----------------------------------------------------------------------------------
    def run(self) -> PipelineResult:
        """Run to the end of the stream (or max_frames, quit, Ctrl-C); raises :class:`PipelineError`."""
        if self._ran:
            raise RuntimeError("a Pipeline runs once; build a new one")
        self._ran = True
        bodies = {"source": self._source_stage, "preprocess": self._preprocess_stage,
                  "inference": self._inference_stage, "overlay": self._overlay_stage,
                  "sinks": self._sink_stage}
        threads = [threading.Thread(target=self._run_stage, args=(name, body), name=f"stage {name}",
                                    daemon=True) for name, body in bodies.items()]
        started = time.perf_counter()
        stopped: str | None = None
        try:
            for thread in threads:
                thread.start()
            stopped = self._supervise(threads)
        except KeyboardInterrupt:
            stopped = "interrupted"
        finally:
            self._stop.set()
            self._join(threads)
            self.source.close()
        if self._failure is not None:
            raise self._failure
        return _result("threaded", self.source, self._output, self.stats, time.perf_counter() - started,
                       stopped or self._end_reason)

    def _supervise(self, threads: list[threading.Thread]) -> str | None:
        last_progress = 0.0
        expected = self.source.info.frame_count
        if expected and self.settings.max_frames:
            expected = min(expected, self.settings.max_frames)
        while not self._finished.is_set() and self._failure is None:
            if self.display is not None:
                try:
                    picture = self._display_queue.get(timeout=_POLL_S)
                except queue.Empty:
                    picture = None
                if picture is not None and not self.display.show(picture):
                    return "user"
            else:
                self._finished.wait(_POLL_S)
            if not any(thread.is_alive() for thread in threads):
                break
            now = time.perf_counter()
            if self.progress is not None and now - last_progress >= _PROGRESS_INTERVAL_S:
                last_progress = now
                self.progress(self._output.frames, expected, self._output.fps)
        if self.progress is not None:
            self.progress(self._output.frames, expected, self._output.fps)
        return None

    def _join(self, threads: list[threading.Thread]) -> None:
        deadline = time.perf_counter() + self.settings.join_timeout_s
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.perf_counter()))
        stuck = [thread.name.removeprefix("stage ") for thread in threads if thread.is_alive()]
        if stuck:
            self._fail(PipelineError(stuck[0], self._current[stuck[0]],
                                     f"did not stop within {self.settings.join_timeout_s:g} s"))


def with_display(frame: Frame, preprocessor: Any, tensor: np.ndarray, base: str) -> Frame:
    """``frame`` with the preprocessor's display picture attached (the hologram phase the overlay draws
    on), when the overlay asks for one (``overlay.base: auto``) and the preprocessor makes one."""
    make = getattr(preprocessor, "display_image", None)
    if base != "auto" or make is None:
        return frame
    display = make(tensor)
    return frame if display is None else dataclasses.replace(frame, display=display)


def run_sequential(source: Source, preprocessor: Callable[[np.ndarray], np.ndarray],
                   inference: InferenceWorker, renderer: OverlayRenderer, sinks: Sequence[Sink],
                   settings: PipelineConfig | None = None, *, display: Display | None = None,
                   progress: Progress | None = None) -> PipelineResult:
    """The naive loop: read -> preprocess -> infer -> overlay -> write, one frame at a time, one thread.

    Same outputs and the same result structure as :meth:`Pipeline.run` (queue columns are zero, batch
    size is 1); a failure raises :class:`PipelineError` naming the stage, Ctrl-C returns
    ``stopped="interrupted"``; sinks and source are closed in any case.
    """
    settings = settings or PipelineConfig()
    stats = {name: StageStats(name) for name in STAGES}
    output = _Output()
    rate = _RecentRate()
    expected = source.info.frame_count
    if expected and settings.max_frames:
        expected = min(expected, settings.max_frames)
    stage, index = "source", None
    stopped = "end of stream"
    failure: PipelineError | None = None
    started = last_progress = time.perf_counter()
    try:
        while True:
            if settings.max_frames and stats["source"].frames >= settings.max_frames:
                stopped = "max_frames"
                break
            stage, index = "source", None
            start = time.perf_counter()
            frame = source.read()
            if isinstance(frame, EndOfStream):
                break
            index = frame.index
            stats["source"].record(time.perf_counter() - start)
            stage = "preprocess"
            start = time.perf_counter()
            tensor = preprocessor(frame.image)
            frame = with_display(frame, preprocessor, tensor, renderer.base)
            stats["preprocess"].record(time.perf_counter() - start)
            stage = "inference"
            if inference.warmup(tensor.shape):
                output.ready_at = time.perf_counter()
            start = time.perf_counter()
            labels = inference.predict([tensor], [frame.image.shape[:2]])[0]
            stats["inference"].record(time.perf_counter() - start)
            stage = "overlay"
            start = time.perf_counter()
            hud = HudInfo(rate.tick(start), (start - frame.timestamp) * 1000.0, source.frames_dropped)
            picture = renderer.render(picture_of(frame, renderer.base), labels, hud)
            done = time.perf_counter()
            stats["overlay"].record(done - start, t_done=done)
            stage = "sinks"
            item = Rendered(frame, labels, picture, (done - frame.timestamp) * 1000.0)
            start = time.perf_counter()
            for sink in sinks:
                sink.write(item)
            done = time.perf_counter()
            stats["sinks"].record(done - start, t_done=done)
            output.done(frame, done)
            if display is not None and not display.show(picture):
                stopped = "user"
                break
            if progress is not None and done - last_progress >= _PROGRESS_INTERVAL_S:
                last_progress = done
                progress(output.frames, expected, output.fps)
    except KeyboardInterrupt:
        stopped = "interrupted"
    except Exception as exc:
        failure = PipelineError(stage, index, exc)
        failure.__cause__ = exc
    finally:
        closing = close_all(sinks)
        source.close()
    if failure is None and closing is not None:
        failure = PipelineError("sinks", None, closing)
    if failure is not None:
        raise failure
    if progress is not None:
        progress(output.frames, expected, output.fps)
    return _result("sequential", source, output, stats, time.perf_counter() - started, stopped)
