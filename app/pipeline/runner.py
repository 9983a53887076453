"""The pipeline: five stage objects of the same shape, and the two drivers that run them.

Stage objects (:class:`Stage`), in order (:data:`STAGES`)::

    source -> preprocess -> inference -> overlay -> sinks        (+ display, in the caller's thread)
    Frame     Preprocessed  Segmented    Rendered    Rendered

Each has a ``name``, ``process(items) -> items`` (a list in, one output per item out; the source takes
an empty list and returns one frame or the end marker) and ``close()``; ``prepare(items)`` is untimed
work before ``process`` (the backend's warm-up), ``batch_size`` how many items it takes at once (1, but
the inference worker's ``batch_size`` for inference). A :class:`Pipeline` builds one set of them, and
the driver around every call is the same: the frame being worked on is remembered for error messages,
``process`` is timed with ``time.perf_counter`` into the stage's :class:`~app.pipeline.stats.StageStats`,
and the frames leaving the last stage are booked end to end (latency, fps).

Drivers (a pipeline runs once, with either):

* :meth:`Pipeline.run` (``mode="threaded"``): one thread per stage, joined by bounded
  :class:`~app.pipeline.queues.Edge` queues of ``pipeline.queue_size``; inference takes batches of up
  to ``batch_size``, waiting at most ``batch_timeout_ms`` for more after the first. The caller's thread
  shows the newest overlay on the display, reports progress and supervises.
* :meth:`Pipeline.run_sequential` / :func:`run_sequential` (``mode="sequential"``): the naive loop the
  threaded one is compared with: one frame at a time through the same stage objects, batch size 1,
  no threads (queue columns are zero).

Edge policies, decided once from ``source.live`` by :func:`make_edges` (``edges[name]`` is the queue
after stage ``name``):

* A live source (camera, stream, paced synthetic) never waits: the edges after ``source`` and after
  ``preprocess`` are ``DROP_OLDEST``; when one is full its oldest frame is discarded and counted in the
  ``dropped`` statistic of the stage that feeds it. The edge in front of the model then holds only one
  batch, so stale frames cannot pile up there and latency stays at about one model call plus
  ``batch_size`` source frame intervals.
* A file source uses ``BLOCK`` edges throughout: backpressure, no frame is ever lost. Edges after
  inference always block.

Common rules:

* The source delivers its first frame and then waits until the backend has warmed up on it (threaded;
  the sequential loop runs that frame through first anyway): frames captured during the warm-up would
  only queue up and make the first latencies and the fps meaningless. Stage timings exclude every
  warm-up. Latency is counted from each frame's capture, except that the first warm-up (a one-off
  start-up cost) is not: a frame captured before it ended counts from its end. A later warm-up (a new
  input shape) is counted: the frames waiting behind it did wait.
* End of stream is the :data:`~app.pipeline.frames.END_OF_STREAM` marker, forwarded along every edge.
* An exception in any stage stops all stages: every queue operation waits at most 50 ms between checks
  of the stop event, every join has a timeout (``pipeline.join_timeout_s``), and the run raises
  :class:`PipelineError` naming the stage and frame ("inference stage failed on frame 17: ...").
* Ctrl-C or the display asking to quit stops all stages; every stage is closed at the end (sinks
  finalise their files) in any case, and the result's ``stopped`` says why the run ended. While a run
  is under way in the main thread, Ctrl-C does not raise (:func:`app.errors.deferred_interrupts`): it
  sets the stop event, so no stage is cut off mid-write; a second press is absorbed while the outputs
  are finished, a third within two seconds aborts, naming the stages and files left open
  (:meth:`Pipeline.unfinished`). A KeyboardInterrupt raised by the display or the progress callback
  stops the run the same way.
* A stage that does not stop within ``join_timeout_s`` (stuck in one long call) is left running while
  the others close and finish their files; the run raises :class:`StageStuck` naming it (exit 130
  after Ctrl-C), whose ``left_running`` tells the CLI to leave with ``os._exit`` (see
  :mod:`app.errors`).

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
Per-stage statistics (:mod:`app.pipeline.stats`) cover frames, fps, mean/p50/p95 ms per frame,
input-queue depth and drops.
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
from typing import Any, NamedTuple, Protocol

import numpy as np

from app.config import PipelineConfig
from app.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, AppError, deferred_interrupts, first_line
from app.pipeline.cpu import affinity_plan
from app.pipeline.frames import EndOfStream, Frame
from app.pipeline.hologram import HologramError
from app.pipeline.inference import InferenceWorker
from app.pipeline.overlay import HudInfo, OverlayRenderer, picture_of
from app.pipeline.queues import POLL_S, Edge, EdgePolicy, Stopped, wait_for
from app.pipeline.sinks import Rendered, Sink, close_all
from app.pipeline.sources import Source
from app.pipeline.stats import LatencyRecorder, StageStats, fps_over

log = logging.getLogger(__name__)

STAGES = ("source", "preprocess", "inference", "overlay", "sinks")
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
        self.result: PipelineResult | None = None  # what the run did before it failed (for --stats)
        if isinstance(cause, BaseException):  # the stage's error type says what failed: keep it
            text, name = first_line(cause), type(cause).__name__
            detail = name if text == name else f"{name}: {text}"
        else:
            detail = cause
        where = f" on frame {frame_index}" if frame_index is not None else ""
        super().__init__(f"{stage} stage failed{where}: {detail}")
        if isinstance(cause, BaseException):
            self.__cause__ = cause

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return EXIT_USAGE if isinstance(self.cause, HologramError) else EXIT_FAILURE


class StageStuck(PipelineError):
    """Stage threads (``left_running``, the first named) that did not stop within ``timeout_s``: each
    is stuck in one call (a model call on a huge frame) and is left running, while every other stage
    has closed (the sinks finished their files). Exit 130 when the run was interrupted (the user asked
    to stop, and it did), 1 otherwise."""

    def __init__(self, stuck: Sequence[str], frame_index: int | None, timeout_s: float, interrupted: bool) -> None:
        also = f" (so is the {', '.join(stuck[1:])} stage)" if len(stuck) > 1 else ""
        super().__init__(stuck[0], frame_index,
                         f"did not stop within {timeout_s:g} s; left running{also}, the other stages closed")
        self.left_running = tuple(stuck)
        self.interrupted = interrupted

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return EXIT_INTERRUPTED if self.interrupted else EXIT_FAILURE


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

    ``latency`` is capture -> written (ms: mean/p50/p95) for every frame, a frame captured before the
    first backend warm-up ended counting from its end; ``stopped`` is "end of stream",
    "max_frames", "user" (display quit), "stopped" (:meth:`Pipeline.stop`) or "interrupted" (Ctrl-C); ``stats`` maps stage name to
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


# -- what flows between the stages ----------------------------------------------------------------------

class Preprocessed(NamedTuple):
    """Output of the preprocess stage: the frame (display picture attached) and its C×H×W float32 tensor."""

    frame: Frame
    tensor: np.ndarray


class Segmented(NamedTuple):
    """Output of the inference stage: the frame and its H×W uint8 label map at the frame's size."""

    frame: Frame
    labels: np.ndarray


def _index_of(item: Frame | Preprocessed | Segmented | Rendered) -> int:
    return item.index if isinstance(item, Frame) else item.frame.index


# -- stage objects ----------------------------------------------------------------------------------------

class Stage:
    """The shape every stage has. ``process(items)`` maps a list of inputs to one output each (see the
    module docstring); ``prepare(items)`` is untimed work before it; ``close()`` releases what the stage
    holds. The threaded driver hands over up to ``batch_size`` items at once, waiting at most
    ``batch_timeout_ms`` for more after the first. A stage object is used by one thread at a time."""

    name = ""
    batch_size = 1
    batch_timeout_ms = 0.0

    def prepare(self, items: list[Any]) -> None:
        """Untimed work before :meth:`process` (nothing, but the model's warm-up)."""

    def process(self, items: list[Any]) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the stage holds (nothing, but the source and the sinks)."""


class SourceStage(Stage):
    """``process([])`` -> ``[frame]`` or ``[END_OF_STREAM]`` (at the end, or once ``stop`` is set)."""

    name = "source"

    def __init__(self, source: Source, stop: threading.Event) -> None:
        self.source = source
        self.stop = stop

    def process(self, items: list[Any]) -> list[Frame | EndOfStream]:
        return [self.source.read(self.stop)]

    def close(self) -> None:
        self.source.close()


class PreprocessStage(Stage):
    """Frames -> :class:`Preprocessed` (the preprocessor's tensor; the display picture attached)."""

    name = "preprocess"

    def __init__(self, preprocessor: Callable[[np.ndarray], np.ndarray], base: str, phase: bool = False) -> None:
        self.preprocessor = preprocessor
        self.base = base
        self.phase = getattr(preprocessor, "phase_image", None) if phase else None

    def process(self, items: list[Frame]) -> list[Preprocessed]:
        out = []
        for frame in items:
            tensor = self.preprocessor(frame.image)
            frame = with_display(frame, self.preprocessor, tensor, self.base)
            if self.phase is not None:  # the object read-out measures dry mass from it
                frame = dataclasses.replace(frame, phase=self.phase(tensor))
            out.append(Preprocessed(frame, tensor))
        return out


class InferenceStage(Stage):
    """:class:`Preprocessed` -> :class:`Segmented`, one backend call per batch of equal shapes.

    ``prepare`` warms the backend up (once per input shape); ``warm`` is set once it has, and
    ``ready_at`` is when the first warm-up ended (``time.perf_counter`` seconds, 0 without one): the
    start-up cost that latency and throughput leave out.
    """

    name = "inference"

    def __init__(self, worker: InferenceWorker) -> None:
        self.worker = worker
        self.batch_size = worker.batch_size
        self.batch_timeout_ms = worker.batch_timeout_ms
        self.warm = threading.Event()
        self.ready_at = 0.0

    def prepare(self, items: list[Preprocessed]) -> None:
        if self.worker.warmup(items[0].tensor.shape) and not self.ready_at:
            self.ready_at = time.perf_counter()
        self.warm.set()

    def process(self, items: list[Preprocessed]) -> list[Segmented]:
        predicted = self.worker.predict_with_contacts([item.tensor for item in items],
                                                      [item.frame.image.shape[:2] for item in items])
        return [Segmented(item.frame if contacts is None else dataclasses.replace(item.frame, contacts=contacts),
                          label_map) for item, (label_map, contacts) in zip(items, predicted, strict=True)]


class OverlayStage(Stage):
    """:class:`Segmented` -> :class:`~app.pipeline.sinks.Rendered` (BGR overlay with the HUD: recent fps,
    capture-to-overlay latency, ``frames_dropped()`` so far). With a ``readout``
    (:class:`app.pipeline.readout.ReadOut`), each frame's objects are measured and tracked here, in
    frame order, and drawn (track ids, trails, counts); the sinks get them in ``Rendered.readout``."""

    name = "overlay"

    def __init__(self, renderer: OverlayRenderer, frames_dropped: Callable[[], int], readout: Any = None) -> None:
        self.renderer = renderer
        self.frames_dropped = frames_dropped
        self.readout = readout
        self._recent: deque[float] = deque(maxlen=_HUD_WINDOW)

    def process(self, items: list[Segmented]) -> list[Rendered]:
        out = []
        for frame, labels in items:
            start = time.perf_counter()
            self._recent.append(start)
            hud = HudInfo(fps_over(self._recent[0], self._recent[-1], len(self._recent)),
                          (start - frame.timestamp) * 1000.0, self.frames_dropped())
            base = picture_of(frame, self.renderer.base)
            readout = None
            if self.readout is None:
                picture = self.renderer.render(base, labels, hud)
            else:
                readout = self.readout(frame, labels)
                picture = self.renderer.render(base, labels, hud, readout)
            out.append(Rendered(frame, labels, picture, (time.perf_counter() - frame.timestamp) * 1000.0, readout))
        return out


class SinksStage(Stage):
    """Writes each :class:`~app.pipeline.sinks.Rendered` to every sink and passes it on; ``close``
    finalises all of them, one after the other, and raises the first failure; ``open_paths()`` names
    the ones not closed yet."""

    name = "sinks"

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)
        self._open = list(self.sinks)

    def process(self, items: list[Rendered]) -> list[Rendered]:
        for item in items:
            for sink in self.sinks:
                sink.write(item)
        return items

    def open_paths(self) -> list[str]:
        return [str(getattr(sink, "path", type(sink).__name__)) for sink in self._open]

    def close(self) -> None:
        failure = None
        while self._open:
            closing = close_all(self._open[:1])
            if closing is not None and failure is None:
                failure = closing  # the run's one error line
            elif closing is not None:
                log.error("%s", closing)  # further failures would otherwise go unseen
            del self._open[0]
        if failure is not None:
            raise failure


def with_display(frame: Frame, preprocessor: Any, tensor: np.ndarray, base: str) -> Frame:
    """``frame`` with the preprocessor's display picture attached (the hologram phase the overlay draws
    on), when the overlay asks for one (``overlay.base: auto``) and the preprocessor makes one."""
    make = getattr(preprocessor, "display_image", None)
    if base != "auto" or make is None:
        return frame
    display = make(tensor)
    return frame if display is None else dataclasses.replace(frame, display=display)


def make_edges(live: bool, settings: PipelineConfig) -> dict[str, Edge]:
    """The queue after each stage but the last, keyed by the stage that feeds it: the one place the
    live/file policy is decided (see the module docstring)."""
    size = max(1, settings.queue_size)
    if not live:
        return {name: Edge(size, EdgePolicy.BLOCK) for name in STAGES[:-1]}
    # Each frame waiting in front of the model adds a frame interval of latency: keep one batch.
    return {"source": Edge(size, EdgePolicy.DROP_OLDEST),
            "preprocess": Edge(min(size, max(1, settings.batch_size)), EdgePolicy.DROP_OLDEST),
            "inference": Edge(size, EdgePolicy.BLOCK),
            "overlay": Edge(size, EdgePolicy.BLOCK)}


# -- bookkeeping ------------------------------------------------------------------------------------------

class _Output:
    """End-to-end bookkeeping of frames leaving the sinks (completion times, latencies).

    Every frame's latency counts from its capture, or from the end of the first warm-up (``ready_at()``)
    for a frame captured before it: that wait is a one-off start-up cost, not the pipeline's latency.
    """

    def __init__(self, ready_at: Callable[[], float]) -> None:
        self.frames = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.latencies = LatencyRecorder()
        self.ready_at = ready_at
        self.first_capture: float | None = None

    def done(self, frame: Frame, t_done: float) -> None:
        if self.t_first is None:
            self.t_first = t_done
            self.first_capture = frame.timestamp
        self.t_last = t_done
        self.frames += 1
        self.latencies.add((t_done - max(frame.timestamp, self.ready_at())) * 1000.0)

    @property
    def fps(self) -> float:
        return fps_over(self.t_first, self.t_last, self.frames)

    @property
    def throughput_fps(self) -> float:
        if self.first_capture is None or self.t_last is None:
            return 0.0
        span = self.t_last - max(self.first_capture, self.ready_at())
        return self.frames / span if span > 0 else 0.0


class Pipeline:
    """One run over ready-made parts: the five stage objects (``stages``), the edges between them
    (``edges``, used by the threaded driver) and the statistics. Run once, with :meth:`run` (threads) or
    :meth:`run_sequential` (one frame at a time); see the module docstring."""

    def __init__(self, source: Source, preprocessor: Callable[[np.ndarray], np.ndarray],
                 inference: InferenceWorker, renderer: OverlayRenderer, sinks: Sequence[Sink],
                 settings: PipelineConfig | None = None, *, display: Display | None = None,
                 progress: Progress | None = None, readout: Any = None) -> None:
        self.source = source
        self.settings = settings or PipelineConfig()
        self.display = display
        self.progress = progress
        self._stop = threading.Event()
        self._inference = InferenceStage(inference)
        self.stages: tuple[Stage, ...] = (SourceStage(source, self._stop),
                                          PreprocessStage(preprocessor, renderer.base, readout is not None),
                                          self._inference, OverlayStage(renderer, self.frames_dropped, readout),
                                          SinksStage(sinks))
        self.edges = make_edges(source.live, self.settings)
        self.stats = {stage.name: StageStats(stage.name) for stage in self.stages}
        self._output = _Output(lambda: self._inference.ready_at)
        self._current: dict[str, int | None] = dict.fromkeys(STAGES)
        self._closed: set[str] = set()
        self._ran = False
        self._stopped_by: str | None = None

    def stop(self) -> None:
        """Ask a run to end now, from any thread, as a first Ctrl-C does: the source stops reading, the
        stages end and the sinks finish their files. The result's ``stopped`` is ``"stopped"``."""
        self._stopped_by = "stopped"
        self._stop.set()

    def frames_dropped(self) -> int:
        """Frames dropped so far (edge drops plus drops inside the source); safe to call any time."""
        return sum(edge.dropped for edge in self.edges.values()) + self.source.frames_dropped

    def unfinished(self) -> list[str]:
        """The stages not closed yet, with the frame each is on, and the sinks' files not finished yet,
        e.g. ``["inference (frame 12)", "sinks (run.gif, run.csv)"]``; safe to call any time."""
        left = []
        for stage in self.stages:
            if stage.name in self._closed:
                continue
            if isinstance(stage, SinksStage):
                left.append(f"sinks ({', '.join(stage.open_paths()) or 'no files'})")
            else:
                frame = self._current[stage.name]
                left.append(stage.name if frame is None else f"{stage.name} (frame {frame})")
        return left

    def run(self) -> PipelineResult:
        """Run threaded to the end of the stream (or max_frames, quit, Ctrl-C); raises :class:`PipelineError`."""
        self._claim()
        return _Threads(self).run()

    def run_sequential(self) -> PipelineResult:
        """Run the same stages one frame at a time in this thread; same outputs and result structure."""
        self._claim()
        started = time.perf_counter()
        failure: PipelineError | None = None
        stopped = "end of stream"
        with deferred_interrupts(self._stop.set, self.unfinished) as interrupts:
            try:
                stopped = self._frame_by_frame()
            except KeyboardInterrupt:  # raised by the display or the progress callback
                stopped = "interrupted"
            except PipelineError as error:
                failure = error
            finally:
                closing = self._close()
        if interrupts.interrupted:
            stopped = "interrupted"
        failure = failure or closing
        if failure is not None:
            failure.result = self._result("sequential", time.perf_counter() - started, f"failed: {failure}")
            raise failure
        self._report_progress()
        return self._result("sequential", time.perf_counter() - started, stopped)

    # -- shared by both drivers -----------------------------------------------------------------------------
    def _claim(self) -> None:
        if self._ran:
            raise RuntimeError("a Pipeline runs once; build a new one")
        self._ran = True

    def _step(self, stage: Stage, items: list[Any]) -> list[Any]:
        """``stage.prepare`` (untimed), then ``stage.process`` timed into its statistics; the outputs of
        the last stage are booked end to end. A failure becomes a :class:`PipelineError` naming the
        stage and the (first) frame."""
        self._current[stage.name] = _index_of(items[0]) if items else None
        try:
            stage.prepare(items)
            start = time.perf_counter()
            out = stage.process(items)
        except Exception as exc:
            raise PipelineError(stage.name, self._current[stage.name], exc) from exc
        done = time.perf_counter()
        if isinstance(out[0], EndOfStream):
            return out
        self._current[stage.name] = _index_of(out[0])
        self.stats[stage.name].record(done - start, frames=len(out), t_done=done)
        if stage is self.stages[-1]:
            for item in out:
                self._output.done(item.frame, done)
        return out

    def _source_done(self) -> bool:
        """Whether ``max_frames`` frames were read (a file source) or came out of the sinks (a live
        source, whose frames may be dropped on the way: ``--max-frames 30`` still gives 30 rows)."""
        limit = self.settings.max_frames
        counted = self._output.frames if self.source.live else self.stats["source"].frames
        return bool(limit) and counted >= limit

    def _within_limit(self, items: list[Any]) -> list[Any]:
        """The items the sinks may still write: all, except those of a live source still on the way
        once ``max_frames`` came out."""
        limit = self.settings.max_frames
        if not (limit and self.source.live):
            return items
        return items[:max(0, limit - self._output.frames)]

    def _close(self, stages: Sequence[Stage] | None = None) -> PipelineError | None:
        """Close ``stages`` (default: all), the sinks first; returns the first failure."""
        failure: PipelineError | None = None
        for stage in reversed(self.stages if stages is None else stages):
            try:
                stage.close()
            except Exception as exc:
                failure = failure or PipelineError(stage.name, None, exc)
            finally:
                self._closed.add(stage.name)
        return failure

    def _report_progress(self) -> None:
        if self.progress is not None:
            known = [count for count in (self.source.info.frame_count, self.settings.max_frames) if count]
            self.progress(self._output.frames, min(known) if known else None, self._output.fps)

    def _result(self, mode: str, wall_s: float, stopped: str) -> PipelineResult:
        summaries = {name: stats.summary() for name, stats in self.stats.items()}
        for name, edge in self.edges.items():
            summaries[name]["dropped"] += edge.dropped
        summaries["source"]["dropped"] += self.source.frames_dropped
        info = self.source.info
        output = self._output
        return PipelineResult(mode=mode, frames=output.frames, fps=output.fps, wall_s=wall_s,
                              latency=output.latencies.summary(),
                              frames_dropped=self.frames_dropped(), frames_skipped=self.source.frames_skipped,
                              reconnects=self.source.reconnects, stopped=stopped, stats=summaries,
                              source={"uri": info.uri, "kind": info.kind, "live": info.live,
                                      **self.source.counters()},
                              throughput_fps=output.throughput_fps)

    # -- the sequential driver --------------------------------------------------------------------------------
    def _frame_by_frame(self) -> str:
        """Each frame through all stages before the next is read; returns why it stopped."""
        last_progress = time.perf_counter()
        while not self._source_done() and not self._stop.is_set():
            items = self._step(self.stages[0], [])
            if isinstance(items[0], EndOfStream):  # a stopped source ends its stream too
                return self._stopped_by or "end of stream"
            for stage in self.stages[1:]:
                items = self._step(stage, items)
            if self.display is not None and not self.display.show(items[0].overlay):
                return "user"
            now = time.perf_counter()
            if now - last_progress >= _PROGRESS_INTERVAL_S:
                last_progress = now
                self._report_progress()
        return self._stopped_by or "max_frames"


class _Threads:
    """The threaded driver of a :class:`Pipeline`: one thread per stage between its edges, each closing
    its stage when it ends; the calling thread shows the display, reports progress and joins them."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.stop = pipeline._stop
        backend = pipeline._inference.worker.backend
        self.affinity = (affinity_plan(str(getattr(backend, "device", "")), getattr(backend, "threads", 0) or 0)
                         if pipeline.settings.pin_threads else None)
        self.pictures = Edge(1, EdgePolicy.DROP_OLDEST)  # the newest overlay, for the display
        self.finished = threading.Event()
        self.lock = threading.Lock()
        self.failure: PipelineError | None = None
        self.end_reason = "end of stream"

    def run(self) -> PipelineResult:
        pipeline = self.pipeline
        stages, edges = pipeline.stages, pipeline.edges
        threads = [threading.Thread(target=self._thread,
                                    args=(stage, edges.get(stages[position - 1].name) if position else None,
                                          edges.get(stage.name)),
                                    name=f"stage {stage.name}", daemon=True)
                   for position, stage in enumerate(stages)]
        started = time.perf_counter()
        stopped: str | None = None
        with deferred_interrupts(self.stop.set, pipeline.unfinished) as interrupts:
            try:
                for thread in threads:
                    thread.start()
                stopped = self._supervise(threads)
            except KeyboardInterrupt:  # raised by the display or the progress callback
                stopped = "interrupted"
            finally:
                self.stop.set()
                self._join(threads, interrupted=stopped == "interrupted" or interrupts.interrupted)
                # Each thread closes its own stage as it ends; close those whose thread never started.
                closing = pipeline._close([stage for stage, thread in zip(stages, threads, strict=True)
                                           if thread.ident is None])
                if closing is not None:
                    self._fail(closing)
        if interrupts.interrupted:
            stopped = "interrupted"
        if self.failure is not None:
            self.failure.result = pipeline._result("threaded", time.perf_counter() - started, f"failed: {self.failure}")
            raise self.failure
        return pipeline._result("threaded", time.perf_counter() - started,
                                stopped or pipeline._stopped_by or self.end_reason)

    def _thread(self, stage: Stage, inbox: Edge | None, outbox: Edge | None) -> None:
        if self.affinity is not None:
            try:  # Linux: pid 0 is the calling thread; its own CPU set, not the process's
                os.sched_setaffinity(0, self.affinity["inference" if stage.name == "inference" else "others"])
            except OSError:
                pass
        try:
            if inbox is None:
                self._produce(stage, outbox)
            else:
                self._consume(stage, inbox, outbox)
        except Stopped:
            pass
        except PipelineError as error:
            self._fail(error)
        except BaseException as exc:
            self._fail(PipelineError(stage.name, self.pipeline._current[stage.name], exc))
        finally:
            closing = self.pipeline._close([stage])  # in this thread: sinks finalise even if another hangs
            if closing is not None:
                self._fail(closing)
            if outbox is None:
                self.finished.set()

    def _produce(self, stage: Stage, outbox: Edge | None) -> None:
        """The source's loop: a frame at a time until the end, ``max_frames`` or stop."""
        assert outbox is not None
        while True:
            if self.pipeline._source_done():
                self.end_reason = "max_frames"
                break
            (item,) = self.pipeline._step(stage, [])
            if isinstance(item, EndOfStream):
                if self.stop.is_set():
                    raise Stopped
                break
            outbox.put(item, self.stop)
            if self.pipeline.stats[stage.name].frames == 1:
                wait_for(self.pipeline._inference.warm, self.stop)
        outbox.finish(self.stop)

    def _consume(self, stage: Stage, inbox: Edge, outbox: Edge | None) -> None:
        """Every other stage's loop: batches from ``inbox`` to ``outbox`` (the display after the last)."""
        stats = self.pipeline.stats[stage.name]
        show = self.pipeline.display is not None
        while True:
            stats.sample_queue(inbox.depth)
            items, ended = inbox.get_batch(self.stop, stage.batch_size, stage.batch_timeout_ms)
            if outbox is None:
                items = self.pipeline._within_limit(items)
            if items:
                for item in self.pipeline._step(stage, items):
                    if outbox is not None:
                        outbox.put(item, self.stop)
                    elif show:
                        self.pictures.put(item.overlay, self.stop)
            if ended:
                break
        if outbox is not None:
            outbox.finish(self.stop)

    def _fail(self, error: PipelineError) -> None:
        with self.lock:
            if self.failure is None:
                self.failure = error
        self.stop.set()

    def _supervise(self, threads: list[threading.Thread]) -> str | None:
        pipeline = self.pipeline
        last_progress = 0.0
        while not self.finished.is_set() and not self.stop.is_set():  # a failure or Ctrl-C sets stop
            if pipeline.display is not None:
                try:
                    picture = self.pictures.get(self.stop, timeout_s=POLL_S)
                except (queue.Empty, Stopped):  # nothing new; or stopped, which a failure ends below
                    picture = None
                if picture is not None and not pipeline.display.show(picture):
                    return "user"
            else:
                self.finished.wait(POLL_S)
            if not any(thread.is_alive() for thread in threads):
                break
            now = time.perf_counter()
            if now - last_progress >= _PROGRESS_INTERVAL_S:
                last_progress = now
                pipeline._report_progress()
        pipeline._report_progress()
        return None

    def _join(self, threads: list[threading.Thread], interrupted: bool) -> None:
        """Wait at most ``join_timeout_s`` in all for the threads to end, and as long again for the sinks'
        thread if it is still finishing the files (a slow disk's fsync); a thread still running then is
        stuck in a call: it is left running (daemon), and named by the failure (:class:`StageStuck`)."""
        timeout = self.pipeline.settings.join_timeout_s
        deadline = time.perf_counter() + timeout
        started = [thread for thread in threads if thread.ident is not None]
        for thread in started:
            thread.join(timeout=max(0.0, deadline - time.perf_counter()))
        if threads[-1] in started:
            threads[-1].join(timeout=timeout)
        stuck = [thread.name.removeprefix("stage ") for thread in started if thread.is_alive()]
        if stuck:
            self._fail(StageStuck(stuck, self.pipeline._current[stuck[0]], timeout, interrupted))
            assert self.failure is not None
            self.failure.left_running = tuple(stuck)


def run_sequential(source: Source, preprocessor: Callable[[np.ndarray], np.ndarray],
                   inference: InferenceWorker, renderer: OverlayRenderer, sinks: Sequence[Sink],
                   settings: PipelineConfig | None = None, *, display: Display | None = None,
                   progress: Progress | None = None, readout: Any = None) -> PipelineResult:
    """The naive loop: read -> preprocess -> infer -> overlay -> write, one frame at a time, one thread.

    Same stage objects, outputs and result structure as :meth:`Pipeline.run` (queue columns are zero,
    batch size is 1); a failure raises :class:`PipelineError` naming the stage, Ctrl-C returns
    ``stopped="interrupted"``; all stages (sinks, source) are closed in any case.
    """
    return Pipeline(source, preprocessor, inference, renderer, sinks, settings, display=display,
                    progress=progress, readout=readout).run_sequential()
