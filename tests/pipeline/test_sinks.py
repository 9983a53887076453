"""Sinks: every file reads back with the right frame count and size, written atomically."""

from __future__ import annotations

import csv
import dataclasses
import json
import time

import cv2
import numpy as np
import pytest

from app.config import OutputConfig
from app.files import partial_path
from app.pipeline.frames import Frame, SourceInfo
from app.pipeline.sinks import (
    FrameStatsSink,
    GifSink,
    MaskFolderSink,
    Rendered,
    SinkError,
    VideoSink,
    close_all,
    open_sinks,
)
from tests.pipeline_helpers import count_video_frames, read_gif

pytestmark = pytest.mark.timeout(30)
INFO = SourceInfo("test", "images", live=False)


def items(count: int, height: int = 48, width: int = 64) -> list[Rendered]:
    out = []
    for index in range(count):
        labels = np.zeros((height, width), np.uint8)
        labels[5:15, 5:15] = 1
        labels[30:40, 40:60] = 1
        overlay = np.full((height, width, 3), (index * 25) % 255, np.uint8)
        frame = Frame(index, time.perf_counter(), overlay[:, :, 0], INFO)
        out.append(Rendered(frame, labels, overlay, latency_ms=5.0 + index))
    return out


def test_video_sink_writes_a_playable_file_under_a_temporary_name(tmp_path):
    path = tmp_path / "sub" / "out.mp4"
    sink = VideoSink(path, fps=10)
    for item in items(7):
        sink.write(item)
    assert partial_path(path).exists() and not path.exists()
    sink.close()
    sink.close()  # idempotent
    assert not partial_path(path).exists()
    assert count_video_frames(path) == (7, (48, 64))
    assert sink.codec == "h264" and sink.fps == 10


def test_video_sink_falls_back_to_the_next_opencv_codec_and_fails_clearly_when_none_opens(tmp_path):
    sink = VideoSink(tmp_path / "a.avi", fourccs=("zzzz", "mp4v"))  # .avi: OpenCV, not H.264
    sink.write(items(1)[0])
    sink.close()
    assert sink.codec == "mp4v" and count_video_frames(tmp_path / "a.avi")[0] == 1
    broken = VideoSink(tmp_path / "b.avi", fourccs=("zzzz",))
    with pytest.raises(SinkError, match="tried codecs zzzz"):
        broken.write(items(1)[0])
    broken.close()
    assert not (tmp_path / "b.avi").exists()


def test_sinks_without_frames_leave_no_file(tmp_path):
    sinks = [VideoSink(tmp_path / "a.mp4"), GifSink(tmp_path / "a.gif"),
             FrameStatsSink(tmp_path / "a.csv", ["background", "cell"])]
    assert close_all(sinks) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_gif_sink_applies_stride_scale_and_frame_cap(tmp_path):
    path = tmp_path / "out.gif"
    sink = GifSink(path, fps=10, stride=2, scale=0.5, max_frames=3)
    for item in items(10):
        sink.write(item)
    assert not path.exists()
    sink.close()
    frames = read_gif(path)
    assert len(frames) == 3 and frames[0].shape[:2] == (24, 32)
    assert count_video_frames(path) == (3, (24, 32))  # also readable as a video
    uncapped = GifSink(tmp_path / "all.gif", stride=3, scale=1.0, max_frames=100)
    for item in items(10):
        uncapped.write(item)
    uncapped.close()
    assert len(read_gif(tmp_path / "all.gif")) == 4  # frames 0, 3, 6, 9


def test_mask_folder_holds_one_uint8_png_per_frame(tmp_path):
    sink = MaskFolderSink(tmp_path / "masks")
    written = items(4)
    for item in written:
        sink.write(item)
    sink.close()
    names = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png"]
    mask = cv2.imread(str(tmp_path / "masks" / "000002.png"), cv2.IMREAD_UNCHANGED)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, written[2].labels)


def test_masks_are_named_after_the_source_frames_and_a_name_that_comes_round_again_keeps_both(tmp_path):
    sink = MaskFolderSink(tmp_path / "masks")
    named = [("frame7.png", 0), ("stack_p003", 1), ("shot.TIF", 2), ("frame7.png", 3)]  # the last: a second pass
    for item, (name, index) in zip(items(4), named, strict=True):
        sink.write(dataclasses.replace(item, frame=dataclasses.replace(item.frame, name=name, index=index)))
    sink.close()
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [
        "frame7.png", "frame7_000003.png", "shot.png", "stack_p003.png"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_frame_stats_table_has_class_fractions_components_and_latency(tmp_path, suffix):
    path = tmp_path / f"stats{suffix}"
    sink = FrameStatsSink(path, ["background", "cell"])
    for item in items(3):
        sink.write(item)
    assert not path.exists()
    sink.close()
    if suffix == ".csv":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3
    assert list(rows[0]) == ["frame", "time_s", "latency_ms", "components", "background", "cell"]
    row = rows[1]
    cell_fraction = (100 + 200) / (48 * 64)
    assert float(row["cell"]) == pytest.approx(cell_fraction, abs=1e-5)
    assert float(row["background"]) + float(row["cell"]) == pytest.approx(1.0, abs=1e-5)
    assert int(row["components"]) == 2 and int(row["frame"]) == 1
    assert float(row["latency_ms"]) == pytest.approx(6.0)


def test_frame_stats_time_is_seconds_since_the_first_frame_not_a_clock_reading(tmp_path):
    sink = FrameStatsSink(tmp_path / "t.jsonl", ["background", "cell"])
    for index, item in enumerate(items(3)):  # captured 1000 s into some clock, 0.04 s apart
        sink.write(dataclasses.replace(item, frame=dataclasses.replace(item.frame, timestamp=1000.0 + 0.04 * index)))
    sink.close()
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [row["time_s"] for row in rows] == pytest.approx([0.0, 0.04, 0.08])


def test_open_sinks_follows_the_output_config_and_bad_folders_fail_clearly(tmp_path):
    output = OutputConfig(video=str(tmp_path / "v.mp4"), gif=str(tmp_path / "g.gif"),
                          masks_dir=str(tmp_path / "m"), csv=str(tmp_path / "s.jsonl"), gif_stride=1)
    sinks = open_sinks(output, ["background", "cell"])
    assert [type(s).__name__ for s in sinks] == ["VideoSink", "GifSink", "MaskFolderSink", "FrameStatsSink"]
    for item in items(2):
        for sink in sinks:
            sink.write(item)
    assert close_all(sinks) is None
    assert count_video_frames(tmp_path / "v.mp4")[0] == 2 and len(read_gif(tmp_path / "g.gif")) == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(SinkError, match="cannot create"):
        VideoSink(tmp_path / "file" / "v.mp4")


def test_close_all_closes_every_sink_and_returns_the_first_failure(tmp_path):
    class Failing:
        path = tmp_path / "bad"

        def close(self):
            raise OSError("disk full")

    good = VideoSink(tmp_path / "good.mp4")
    good.write(items(1)[0])
    error = close_all([Failing(), good])
    assert isinstance(error, SinkError) and "disk full" in str(error)
    assert count_video_frames(tmp_path / "good.mp4")[0] == 1
