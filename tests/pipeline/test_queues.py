"""Queue edges: drop-oldest keeps the newest and counts drops, block waits and stops, batches end."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from app.pipeline.frames import END_OF_STREAM
from app.pipeline.queues import (
    POLL_S,
    Edge,
    EdgePolicy,
    Stopped,
    collect_batch,
    get,
    put_dropping_oldest,
    wait_for,
)

pytestmark = pytest.mark.timeout(10)


def drain(edge: Edge) -> list:
    items = []
    while edge.depth:
        items.append(edge.queue.get_nowait())
    return items


def stop_after(seconds: float) -> threading.Event:
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    return stop


def test_drop_oldest_never_waits_keeps_the_newest_and_counts_what_it_dropped():
    edge = Edge(2, EdgePolicy.DROP_OLDEST)
    stop = threading.Event()
    start = time.perf_counter()
    for item in range(5):
        edge.put(item, stop)
    assert time.perf_counter() - start < POLL_S  # no put waited for room
    assert edge.dropped == 3
    assert drain(edge) == [3, 4]


def test_put_dropping_oldest_returns_the_number_dropped():
    target: queue.Queue = queue.Queue(maxsize=1)
    assert put_dropping_oldest(target, "a") == 0
    assert put_dropping_oldest(target, "b") == 1
    assert target.get_nowait() == "b"


def test_block_waits_for_room_and_loses_nothing():
    edge = Edge(1, EdgePolicy.BLOCK)
    stop = threading.Event()
    edge.put("a", stop)
    threading.Timer(0.1, edge.queue.get).start()  # a consumer takes "a" a little later
    start = time.perf_counter()
    edge.put("b", stop)
    assert time.perf_counter() - start >= 0.08
    assert edge.dropped == 0 and drain(edge) == ["b"]


def test_a_blocked_put_raises_stopped_soon_after_stop_is_set():
    edge = Edge(1, EdgePolicy.BLOCK)
    edge.put("a", threading.Event())
    stop = stop_after(0.1)
    start = time.perf_counter()
    with pytest.raises(Stopped):
        edge.put("b", stop)
    assert 0.08 <= time.perf_counter() - start < 0.1 + 3 * POLL_S
    assert drain(edge) == ["a"]


def test_the_end_marker_waits_even_on_a_drop_oldest_edge_and_drops_nothing():
    edge = Edge(1, EdgePolicy.DROP_OLDEST)
    edge.put("frame", threading.Event())
    with pytest.raises(Stopped):
        edge.finish(stop_after(0.1))
    assert edge.dropped == 0 and drain(edge) == ["frame"]
    edge.finish(threading.Event())
    assert edge.get(threading.Event()) is END_OF_STREAM


def test_get_raises_stopped_when_stopped_and_empty_after_its_timeout():
    edge = Edge(1)
    with pytest.raises(Stopped):
        edge.get(stop_after(0.05))
    start = time.perf_counter()
    with pytest.raises(queue.Empty):
        get(edge.queue, threading.Event(), timeout_s=0.1)
    assert 0.09 <= time.perf_counter() - start < 0.5


def test_an_edge_holds_at_least_one_item():
    with pytest.raises(ValueError, match="at least one"):
        Edge(0)


def test_collect_batch_takes_at_most_batch_size_items():
    edge = Edge(8)
    stop = threading.Event()
    for item in range(6):
        edge.put(item, stop)
    assert edge.get_batch(stop, batch_size=4, batch_timeout_ms=1000) == ([0, 1, 2, 3], False)
    assert edge.get_batch(stop, batch_size=1, batch_timeout_ms=1000) == ([4], False)
    assert edge.depth == 1


def test_collect_batch_waits_at_most_the_timeout_for_more_after_the_first():
    edge = Edge(8)
    stop = threading.Event()
    edge.put("a", stop)
    start = time.perf_counter()
    assert edge.get_batch(stop, batch_size=4, batch_timeout_ms=50) == (["a"], False)
    assert 0.04 <= time.perf_counter() - start < 0.5


def test_collect_batch_stops_at_the_end_marker_and_leaves_it_out():
    edge = Edge(8)
    stop = threading.Event()
    for item in ("a", "b"):
        edge.put(item, stop)
    edge.finish(stop)
    assert edge.get_batch(stop, batch_size=4, batch_timeout_ms=1000) == (["a", "b"], True)
    edge.finish(stop)
    assert edge.get_batch(stop, batch_size=4, batch_timeout_ms=1000) == ([], True)


def test_collect_batch_raises_stopped_while_waiting_for_the_first_item():
    items: queue.Queue = queue.Queue(maxsize=2)
    with pytest.raises(Stopped):
        collect_batch(items, stop_after(0.05), 4, 50, lambda item: item is END_OF_STREAM)


def test_wait_for_returns_once_the_event_is_set_and_raises_stopped_on_stop():
    ready = threading.Event()
    threading.Timer(0.05, ready.set).start()
    wait_for(ready, threading.Event())
    assert ready.is_set()
    with pytest.raises(Stopped):
        wait_for(threading.Event(), stop_after(0.05))
