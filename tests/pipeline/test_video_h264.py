"""Video out: H.264 through PyAV at the source's frame rate, fragmented so a killed run leaves a playable
prefix, and OpenCV's mp4v when PyAV is missing, saying so."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from app.files import partial_path
from app.pipeline.frames import Frame, SourceInfo
from app.pipeline.sinks import Rendered, VideoSink
from tests.pipeline_helpers import count_video_frames

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]


def rendered(count: int, info: SourceInfo, height: int = 48, width: int = 64) -> list[Rendered]:
    out = []
    for index in range(count):
        overlay = np.full((height, width, 3), (index * 25) % 255, np.uint8)
        labels = np.zeros((height, width), np.uint8)
        out.append(Rendered(Frame(index, time.perf_counter(), overlay[:, :, 0], info), labels, overlay, 5.0))
    return out


def codec_and_rate(path: Path) -> tuple[str, float, int]:
    """Codec name, frame rate and decoded frame count, read back with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return stream.codec_context.name, float(stream.average_rate), frames


@pytest.mark.parametrize("fps", [12.5, 30000 / 1001])
def test_mp4_is_h264_at_the_source_frame_rate(tmp_path, fps, caplog):
    path = tmp_path / "out.mp4"
    sink = VideoSink(path, default_fps=25.0)
    with caplog.at_level(logging.INFO, logger="app.pipeline.sinks.video"):
        for item in rendered(9, SourceInfo("run.avi", "video", live=False, fps=fps)):
            sink.write(item)
    sink.close()
    codec, rate, frames = codec_and_rate(path)
    assert (codec, frames, sink.codec) == ("h264", 9, "h264")
    assert rate == pytest.approx(fps, rel=1e-6)
    assert [r.getMessage() for r in caplog.records] == [f"writing {path}: H.264 (libx264 through PyAV) at {fps:g} fps"]


def test_without_a_source_rate_the_configured_default_is_used_and_odd_sizes_are_padded(tmp_path):
    path = tmp_path / "odd.mp4"
    sink = VideoSink(path, default_fps=7.0)
    for item in rendered(3, SourceInfo("camera0", "camera", live=True), height=33, width=45):
        sink.write(item)
    sink.close()
    codec, rate, frames = codec_and_rate(path)
    assert (codec, rate, frames) == ("h264", 7.0, 3)
    assert count_video_frames(path) == (3, (34, 46))


def test_without_pyav_the_video_is_mp4v_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    path = tmp_path / "out.mp4"
    sink = VideoSink(path)
    with caplog.at_level(logging.INFO, logger="app.pipeline.sinks.video"):
        for item in rendered(4, SourceInfo("synthetic", "synthetic", live=False, fps=10.0)):
            sink.write(item)
    sink.close()
    assert sink.codec == "mp4v" and sink.fps == 10.0
    assert [r.getMessage() for r in caplog.records] == [
        f"writing {path}: mp4v (OpenCV; no H.264 encoder through PyAV) at 10 fps"]
    monkeypatch.undo()
    assert codec_and_rate(path) == ("mpeg4", 10.0, 4)


KILLED_WRITER = """
import os, signal, sys, time
import numpy as np
from app.pipeline.frames import Frame, SourceInfo
from app.pipeline.sinks import Rendered, VideoSink
sink = VideoSink(sys.argv[1], fps=10)
info = SourceInfo("x", "video", live=False)
for index in range(45):
    overlay = np.random.default_rng(index).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    sink.write(Rendered(Frame(index, 0.0, overlay[:, :, 0], info), overlay[:, :, 0], overlay, 0.0))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_run_leaves_a_playable_prefix_under_the_temporary_name(tmp_path):
    path = tmp_path / "killed.mp4"
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=50, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not path.exists()
    codec, _, frames = codec_and_rate(partial_path(path))
    # Key frames every second (10 frames): the fragments finished before the kill are all on disk.
    assert codec == "h264" and 30 <= frames <= 45
