"""Run statistics: exact figures for runs that fit the sample, bounded memory for runs that do not."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from app.pipeline.stats import SAMPLE_CAPACITY, LatencyRecorder, StageStats, latency_summary


def test_recorder_below_capacity_equals_the_full_list_bit_for_bit():
    values = list(np.random.default_rng(0).gamma(2.0, 3.0, 5000))
    recorder = LatencyRecorder(capacity=5000)
    for value in values:
        recorder.add(value)
    assert recorder.summary() == latency_summary(values)
    assert len(recorder) == 5000
    assert LatencyRecorder().summary() == {"mean_ms": 0.0, "p50_ms": 0.0, "p95_ms": 0.0}


def test_recorder_past_capacity_keeps_the_exact_mean_and_close_percentiles():
    values = np.random.default_rng(1).uniform(0.0, 100.0, 200_000)
    recorder = LatencyRecorder(capacity=2000)
    for value in values:
        recorder.add(float(value))
    summary = recorder.summary()
    assert len(recorder) == values.size
    assert summary["mean_ms"] == pytest.approx(values.mean(), rel=1e-9)
    # A uniform sample of 2000 puts the median within ~1.1 and the 95th percentile within ~0.5 (1 sigma).
    assert summary["p50_ms"] == pytest.approx(50.0, abs=5.0)
    assert summary["p95_ms"] == pytest.approx(95.0, abs=2.5)


def test_recorder_sample_spans_the_whole_run_not_only_its_end():
    """A slow first half must still show in the percentiles after many fast frames (no ring buffer)."""
    recorder = LatencyRecorder(capacity=1000)
    recorder.add(100.0, repeat=50_000)
    recorder.add(1.0, repeat=50_000)
    assert recorder.summary()["p95_ms"] == 100.0
    assert recorder.summary()["mean_ms"] == pytest.approx(50.5)


def test_stage_summary_for_a_short_run_is_what_full_lists_give():
    stats = StageStats("inference")
    per_frame, depths = [], []
    rng = np.random.default_rng(2)
    for step in range(300):
        batch = int(rng.integers(1, 5))
        seconds = float(rng.uniform(0.001, 0.05))
        stats.record(seconds, frames=batch, t_done=float(step))
        per_frame += [seconds / batch] * batch
        depth = int(rng.integers(0, 9))
        stats.sample_queue(depth)
        depths.append(depth)
    summary = stats.summary()
    expected = latency_summary(np.asarray(per_frame) * 1000.0)
    assert {key: summary[key] for key in expected} == expected
    assert summary["queue_max"] == max(depths) and summary["queue_mean"] == float(np.mean(depths))
    assert summary["frames"] == len(per_frame) and summary["fps"] == (len(per_frame) - 1) / 299.0
    assert set(summary) == {"frames", "fps", "mean_ms", "p50_ms", "p95_ms", "queue_max", "queue_mean", "dropped",
                            "mean_batch"}


def test_stage_stats_stay_the_same_size_however_long_the_run():
    """Per-frame arrays grew by 16 bytes a frame: a day at 25 fps was hundreds of MB."""
    stats = StageStats("overlay")

    def run(frames: int) -> None:
        for _ in range(frames):
            stats.sample_queue(1)
            stats.record(0.002)

    run(SAMPLE_CAPACITY)  # the sample is full from here on
    tracemalloc.start()
    try:
        run(40_000)
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grown < 4096, f"{grown} bytes more after 40,000 frames"
    assert stats.summary()["frames"] == SAMPLE_CAPACITY + 40_000
    assert stats.summary()["mean_ms"] == pytest.approx(2.0)
