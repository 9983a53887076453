"""Per-stage timing statistics and the end-of-run summary.

A :class:`StageStats` is filled by exactly one stage thread and read once the run is over; the
runner adds the frames dropped on the stage's output edge to its summary's ``dropped``. Units: seconds in, milliseconds out.
FPS over N frames is ``(N - 1) / (t_last - t_first)`` of the frames' completion times (0 for N < 2).

Memory is bounded however long a run lasts: counts, means and the queue maximum are running totals,
and percentiles come from a :class:`LatencyRecorder` sample of at most :data:`SAMPLE_CAPACITY` values
per figure, which holds every value of a shorter run (so its figures are exact).

API:
    StageStats(name).record(seconds, frames=1, t_done=None); .sample_queue(depth)
    StageStats.summary() -> {"frames", "fps", "mean_ms", "p50_ms", "p95_ms", "queue_max", "queue_mean", "dropped"}
    LatencyRecorder().add(ms, repeat=1); .summary() -> {"mean_ms", "p50_ms", "p95_ms"}
    fps_over(t_first, t_last, frames) -> float
    latency_summary(latencies_ms) -> {"mean_ms", "p50_ms", "p95_ms"}
    format_table(result_dict) -> str          # the table printed on stderr at the end of a run
    write_json(path, data)                    # atomic (temporary name + os.replace)
"""

from __future__ import annotations

import json
import random
import time
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from app.files import write_text


def fps_over(t_first: float | None, t_last: float | None, frames: int) -> float:
    """Frames per second over ``frames`` completions between ``t_first`` and ``t_last`` (seconds)."""
    if frames < 2 or t_first is None or t_last is None or t_last <= t_first:
        return 0.0
    return (frames - 1) / (t_last - t_first)


def latency_summary(values_ms: Any) -> dict[str, float]:
    """Mean, median and 95th percentile of a sequence of milliseconds (zeros when empty)."""
    data = np.asarray(values_ms, dtype=np.float64)
    if data.size == 0:
        return {"mean_ms": 0.0, "p50_ms": 0.0, "p95_ms": 0.0}
    return {"mean_ms": float(data.mean()), "p50_ms": float(np.percentile(data, 50)),
            "p95_ms": float(np.percentile(data, 95))}


SAMPLE_CAPACITY = 10_000
"""Values a :class:`LatencyRecorder` keeps for percentiles (80 kB); a run up to this many frames is exact."""


class LatencyRecorder:
    """Count, mean, median and 95th percentile of a stream of milliseconds, in bounded memory.

    Count and mean are running totals over every value. Percentiles are those of a uniform random
    sample of at most ``capacity`` values (reservoir sampling, Vitter's algorithm R, seeded so a run
    is reproducible): until ``capacity`` values have come, the sample is all of them and
    :meth:`summary` equals :func:`latency_summary` of the full list, bit for bit. Not thread-safe: one
    writer, read when it is done.
    """

    def __init__(self, capacity: int = SAMPLE_CAPACITY, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.count = 0
        self._total = 0.0
        self._sample = array("d")
        self._random = random.Random(seed)

    def add(self, value: float, repeat: int = 1) -> None:
        """Record ``value`` (ms) ``repeat`` times."""
        for _ in range(repeat):
            if self.count < self.capacity:
                self._sample.append(value)
            else:
                slot = self._random.randrange(self.count + 1)
                if slot < self.capacity:
                    self._sample[slot] = value
            self.count += 1
            self._total += value

    def __len__(self) -> int:
        return self.count

    def summary(self) -> dict[str, float]:
        """``{"mean_ms", "p50_ms", "p95_ms"}`` (zeros when nothing was recorded)."""
        result = latency_summary(np.frombuffer(self._sample, dtype=np.float64))
        if self.count > self.capacity:  # the sample no longer holds every value; the total does
            result["mean_ms"] = self._total / self.count
        return result


class StageStats:
    """Timings of one stage: processing time per frame, completion times, input-queue depth, drops.

    ``record(seconds, frames=n)`` books one unit of work covering ``n`` frames (a batch); each frame
    is charged ``seconds / n`` so the per-frame percentiles stay comparable across batch sizes.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames = 0
        self.batches = 0
        self._per_frame_ms = LatencyRecorder()
        self._queue_samples = 0
        self._queue_total = 0
        self._queue_max = 0
        self._t_first: float | None = None
        self._t_last: float | None = None

    def record(self, seconds: float, frames: int = 1, t_done: float | None = None) -> None:
        """Book ``seconds`` of work for ``frames`` frames finished at ``t_done`` (default: now)."""
        t_done = time.perf_counter() if t_done is None else t_done
        if self._t_first is None:
            self._t_first = t_done
        self._t_last = t_done
        self.frames += frames
        self.batches += 1
        self._per_frame_ms.add(seconds / frames * 1000.0, repeat=frames)

    def sample_queue(self, depth: int) -> None:
        """Remember the depth of this stage's input queue (sampled before each get)."""
        self._queue_samples += 1
        self._queue_total += depth
        self._queue_max = max(self._queue_max, depth)

    @property
    def fps(self) -> float:
        return fps_over(self._t_first, self._t_last, self.frames)

    def summary(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "fps": self.fps,
            **self._per_frame_ms.summary(),
            "queue_max": self._queue_max,
            "queue_mean": self._queue_total / self._queue_samples if self._queue_samples else 0.0,
            "dropped": 0,
            "mean_batch": self.frames / self.batches if self.batches else 0.0,
        }


def format_table(result: dict[str, Any]) -> str:
    """A short human-readable table of a run (``PipelineResult.to_dict()``) for the terminal."""
    header = f"{'stage':<11}{'frames':>7}{'fps':>8}{'mean ms':>9}{'p50 ms':>8}{'p95 ms':>8}" \
             f"{'q max':>7}{'q mean':>8}{'dropped':>9}"
    lines = [header, "-" * len(header)]
    for name, row in result["stats"].items():
        lines.append(f"{name:<11}{row['frames']:>7}{row['fps']:>8.1f}{row['mean_ms']:>9.2f}"
                     f"{row['p50_ms']:>8.2f}{row['p95_ms']:>8.2f}{row['queue_max']:>7}"
                     f"{row['queue_mean']:>8.1f}{row['dropped']:>9}")
    latency = result["latency"]
    lines.append("-" * len(header))
    lines.append(
        f"{result['mode']}: {result['frames']} frames in {result['wall_s']:.2f} s, {result['fps']:.1f} fps "
        f"end to end, latency p50 {latency['p50_ms']:.1f} ms / p95 {latency['p95_ms']:.1f} ms, "
        f"dropped {result['frames_dropped']}, skipped {result['frames_skipped']}, "
        f"reconnects {result['reconnects']} ({result['stopped']})")
    return "\n".join(lines)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` via a temporary name in the same folder."""
    write_text(path, json.dumps(data, indent=2) + "\n")
