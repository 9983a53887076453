"""Clocks and summaries shared by every benchmark.

FPS over N completions stamped with ``time.perf_counter`` is ``(N - 1) / (t_last - t_first)``: the
first completion only starts the clock, so start-up latency is not counted as throughput. A
benchmark runs ``warmup`` untimed repeats, then ``repeats`` timed ones, and reports the median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def synchronize(device: Any = None) -> None:
    """Wait for queued GPU work before a clock is read (no-op on CPU or without torch)."""
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available() and (device is None or "cuda" in str(device)):
        torch.cuda.synchronize()


def fps_from_timestamps(stamps: Sequence[float], items_per_stamp: int = 1) -> float:
    """Items per second between the first and the last completion stamp (seconds)."""
    if len(stamps) < 2:
        raise ValueError("need at least two completion stamps to measure a rate")
    elapsed = stamps[-1] - stamps[0]
    if elapsed <= 0:
        raise ValueError("completion stamps do not increase; the clock is too coarse for this run")
    return (len(stamps) - 1) * items_per_stamp / elapsed


def repeat_rate(run_once: Callable[[], Sequence[float]], repeats: int, warmup: int,
                items_per_stamp: int = 1, before_each: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run ``warmup`` untimed then ``repeats`` timed runs; each returns completion stamps.

    ``before_each`` (e.g. evicting the page cache) runs before every run, outside the timed part.
    Returns ``{"fps": median, "fps_runs": [...], "ms_per_item": 1000 / median}``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        run_once()
    rates = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        rates.append(fps_from_timestamps(run_once(), items_per_stamp))
    fps = statistics.median(rates)
    return {"fps": fps, "fps_runs": rates, "ms_per_item": 1000.0 / fps}


def stamp_each(items: Sequence[Any], step: Callable[[Any], Any], device: Any = None) -> list[float]:
    """Apply ``step`` to every item in order, stamping each completion (GPU synchronised)."""
    stamps = []
    for item in items:
        step(item)
        synchronize(device)
        stamps.append(time.perf_counter())
    return stamps
