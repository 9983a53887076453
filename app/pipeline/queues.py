"""Bounded, stop-aware queues between pipeline stages, and the policy each edge applies when it is full.

Every blocking call here waits at most :data:`POLL_S` (50 ms) at a time and then checks the pipeline's
stop event, raising :class:`Stopped` once it is set, so no stage can hang on a queue.

An :class:`Edge` is one bounded queue between two stages together with its :class:`EdgePolicy`:

* ``BLOCK``: ``put`` waits for room (backpressure): nothing is ever lost. File sources, and every
  edge after inference.
* ``DROP_OLDEST``: ``put`` never waits; when the queue is full the oldest item is discarded to make
  room and counted in ``Edge.dropped``. Live sources: latency stays bounded, the newest frame wins.

The end-of-stream marker is put with :meth:`Edge.finish`, which always waits for room: it is never
dropped and never drops a frame. :func:`collect_batch` takes up to ``batch_size`` items at once (the
inference stage's batches).

API::

    edge = Edge(maxsize, EdgePolicy.DROP_OLDEST); edge.put(item, stop); edge.finish(stop)
    edge.get(stop); edge.get_batch(stop, batch_size, batch_timeout_ms) -> (items, end_seen); edge.depth
    get(q, stop, timeout_s=None); put(q, item, stop); put_dropping_oldest(q, item) -> dropped
    collect_batch(q, stop, batch_size, batch_timeout_ms, is_end) -> (items, end_seen)
    wait_for(event, stop)
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from typing import Any

from app.pipeline.frames import END_OF_STREAM, EndOfStream

POLL_S = 0.05
"""Longest wait (seconds) of any blocking call before it looks at the stop event again."""


class Stopped(Exception):
    """Raised by the stop-aware helpers when the pipeline's stop event is set."""


class EdgePolicy(enum.Enum):
    """What ``put`` does on a full queue (cf. Roboflow inference's ``BufferFillingStrategy``)."""

    BLOCK = "block"
    """Wait for room: backpressure, no item is lost."""
    DROP_OLDEST = "drop_oldest"
    """Never wait: discard the oldest queued item to make room, and count it."""


def get(source: queue.Queue[Any], stop: threading.Event, timeout_s: float | None = None) -> Any:
    """Blocking ``get`` that wakes every :data:`POLL_S` to check ``stop`` (raises :class:`Stopped`).

    With ``timeout_s`` it raises ``queue.Empty`` after that long without an item.
    """
    deadline = None if timeout_s is None else time.perf_counter() + timeout_s
    while True:
        if stop.is_set():
            raise Stopped
        wait = POLL_S if deadline is None else min(POLL_S, deadline - time.perf_counter())
        if wait <= 0:
            return source.get_nowait()
        try:
            return source.get(timeout=wait)
        except queue.Empty:
            if deadline is not None and time.perf_counter() >= deadline:
                raise


def put(target: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    """Blocking ``put`` that wakes every :data:`POLL_S` to check ``stop`` (raises :class:`Stopped`)."""
    while True:
        if stop.is_set():
            raise Stopped
        try:
            target.put(item, timeout=POLL_S)
            return
        except queue.Full:
            continue


def put_dropping_oldest(target: queue.Queue[Any], item: Any) -> int:
    """Put ``item`` without waiting, discarding the oldest queued items to make room; returns how many."""
    dropped = 0
    while True:
        try:
            target.put_nowait(item)
            return dropped
        except queue.Full:
            try:
                target.get_nowait()
                dropped += 1
            except queue.Empty:  # a consumer took one meanwhile
                pass


def wait_for(event: threading.Event, stop: threading.Event) -> None:
    """Wait until ``event`` is set, checking ``stop`` every :data:`POLL_S` (raises :class:`Stopped`)."""
    while not event.wait(POLL_S):
        if stop.is_set():
            raise Stopped


def collect_batch(source: queue.Queue[Any], stop: threading.Event, batch_size: int,
                  batch_timeout_ms: float, is_end: Any) -> tuple[list[Any], bool]:
    """Up to ``batch_size`` items: wait for the first, then at most ``batch_timeout_ms`` for the rest.

    Returns ``(items, end_seen)``; the end marker (``is_end(item)`` true) is not included in ``items``.
    Raises :class:`Stopped` when ``stop`` is set while waiting for the first item.
    """
    first = get(source, stop)
    if is_end(first):
        return [], True
    items = [first]
    deadline = time.perf_counter() + batch_timeout_ms / 1000.0
    while len(items) < batch_size:
        remaining = deadline - time.perf_counter()
        try:
            item = source.get_nowait() if remaining <= 0 else get(source, stop, remaining)
        except queue.Empty:
            break
        if is_end(item):
            return items, True
        items.append(item)
    return items, False


def _is_end(item: Any) -> bool:
    return isinstance(item, EndOfStream)


class Edge:
    """A bounded queue between two stages that applies ``policy`` on ``put``.

    ``dropped`` counts the items a ``DROP_OLDEST`` edge discarded (written by the one producing thread,
    readable any time). ``maxsize`` must be at least 1.
    """

    def __init__(self, maxsize: int, policy: EdgePolicy = EdgePolicy.BLOCK) -> None:
        if maxsize < 1:
            raise ValueError(f"an edge holds at least one item, got maxsize={maxsize}")
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self.policy = policy
        self.dropped = 0

    @property
    def maxsize(self) -> int:
        return self.queue.maxsize

    @property
    def depth(self) -> int:
        """Items waiting now (approximate, as ``queue.Queue.qsize``)."""
        return self.queue.qsize()

    def put(self, item: Any, stop: threading.Event) -> None:
        """Hand ``item`` on: wait for room (``BLOCK``) or make room by dropping the oldest (``DROP_OLDEST``)."""
        if self.policy is EdgePolicy.DROP_OLDEST:
            self.dropped += put_dropping_oldest(self.queue, item)
        else:
            put(self.queue, item, stop)

    def finish(self, stop: threading.Event) -> None:
        """Put the end-of-stream marker; it waits for room whatever the policy (never dropped, drops nothing)."""
        put(self.queue, END_OF_STREAM, stop)

    def get(self, stop: threading.Event, timeout_s: float | None = None) -> Any:
        """The next item (or the end marker); see :func:`get`."""
        return get(self.queue, stop, timeout_s)

    def get_batch(self, stop: threading.Event, batch_size: int, batch_timeout_ms: float) -> tuple[list[Any], bool]:
        """Up to ``batch_size`` items and whether the end marker came; see :func:`collect_batch`."""
        return collect_batch(self.queue, stop, batch_size, batch_timeout_ms, _is_end)

    def __repr__(self) -> str:
        return f"Edge(maxsize={self.maxsize}, policy={self.policy.name}, dropped={self.dropped})"
