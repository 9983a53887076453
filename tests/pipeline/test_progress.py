"""Progress (a tqdm bar with an ETA on a terminal, the plain line otherwise) and how far a run goes:
``--max-frames N`` gives N frames even from a live source that drops, and the live synthetic source is
endless while replay's is finite."""

from __future__ import annotations

import csv
import io

import pytest

from app import live, replay
from app.config import replace
from app.pipeline.frames import SourceInfo
from app.pipeline.runner import Pipeline
from app.pipeline.sinks import FrameStatsSink
from app.pipeline.sources import open_source
from app.run import ProgressBar, ProgressLine, make_progress
from tests.pipeline_helpers import FakeBackend, make_stages, pipeline_settings, small_config

pytestmark = pytest.mark.timeout(60)
FINITE = SourceInfo("seq", "images", live=False, frame_count=40)
ENDLESS = SourceInfo("camera0", "camera", live=True)
TINY_SYNTH = ["--set", "synth.size=32", "--set", "synth.frames=3", "--set", "synth.num_cells=1",
              "--set", "synth.num_particles=0", "--set", "synth.num_dust_rings=0"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_finite_run_shows_a_bar_with_an_eta():
    stream = Terminal()
    progress = make_progress(FINITE, stream)
    assert isinstance(progress, ProgressBar)
    progress(10, 40, 25.0)
    progress(20, 40, 25.0)
    progress.finish()
    last = stream.getvalue().split("\r")[-1]
    assert "20/40" in last and "frames/s" in last
    assert "<" in last  # elapsed<remaining: the ETA


def test_on_a_terminal_an_endless_run_shows_the_count_and_rate_without_an_eta():
    stream = Terminal()
    progress = make_progress(ENDLESS, stream)
    assert isinstance(progress, ProgressBar)
    progress(120, None, 24.0)
    progress.finish()
    last = stream.getvalue().split("\r")[-1]
    assert "120 frames" in last and "frames/s" in last and "<" not in last and "/40" not in last


def test_without_a_terminal_the_plain_line_stays_and_endless_runs_print_none():
    stream = io.StringIO()
    progress = make_progress(FINITE, stream)
    assert isinstance(progress, ProgressLine) and not progress.tty
    progress._last_line = 0.0  # as if 10 s had passed
    progress(20, 40, 25.0)
    assert stream.getvalue() == f"[{'#' * 15}{'.' * 15}] 20/40 frames    25.0 fps\n"
    assert make_progress(ENDLESS, io.StringIO()) is None


def test_max_frames_from_a_live_source_that_drops_gives_that_many_rows_and_progress_totals(tmp_path):
    config = replace(small_config(), source={"fps": 100.0},
                     synth={"size": 32, "frames": 400, "num_cells": 1, "num_particles": 0, "num_dust_rings": 0})
    source = open_source("synthetic", config)
    preprocessor, worker, renderer = make_stages(FakeBackend(delay_s=0.03))  # slower than the source
    sink = FrameStatsSink(tmp_path / "rows.csv", ["background", "cell"])
    totals = []
    result = Pipeline(source, preprocessor, worker, renderer, [sink], pipeline_settings(max_frames=12),
                      progress=lambda done, total, fps: totals.append(total)).run()
    assert result.frames_dropped > 0 and result.stopped == "max_frames"
    assert result.frames == 12
    with open(tmp_path / "rows.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 12
    assert set(totals) == {12}


def rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_live_synthetic_runs_past_its_sequence_length_and_replay_stops_at_it(tiny_weights, tmp_path):
    code = live.main(["--source", "synthetic", "--no-display", "-q", "--weights", str(tiny_weights), *TINY_SYNTH,
                      "--max-frames", "8", "--csv", str(tmp_path / "live.csv")])
    assert code == 0 and len(rows(tmp_path / "live.csv")) == 8  # a 3-frame sequence, over and over
    code = replay.main(["synthetic", "-q", "--weights", str(tiny_weights), *TINY_SYNTH,
                        "--csv", str(tmp_path / "replay.csv")])
    assert code == 0 and [int(row["frame"]) for row in rows(tmp_path / "replay.csv")] == [0, 1, 2]
