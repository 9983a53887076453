"""Sources: every kind of input, end of stream by read failure, pacing, prefetch order, bad input."""

from __future__ import annotations

import functools
import http.server
import random
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.config import Config, SourceConfig, replace
from app.pipeline import sources
from app.pipeline.sources import (
    END_OF_STREAM,
    CameraSource,
    EndOfStream,
    ImageSequenceSource,
    SourceError,
    StreamSource,
    SyntheticSource,
    VideoFileSource,
    natural_key,
    open_source,
    png_damage,
)
from tests.pipeline_helpers import VTEST, write_indexed_images

pytestmark = pytest.mark.timeout(30)


def read_all(source, limit: int = 10_000) -> list:
    frames = []
    for frame in source:
        frames.append(frame)
        if len(frames) >= limit:
            break
    return frames


def write_video(path: Path, count: int, size: tuple[int, int] = (64, 48)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, size)
    assert writer.isOpened()
    for index in range(count):
        writer.write(np.full((size[1], size[0], 3), index * 20 % 255, np.uint8))
    writer.release()


# -- URI parsing and bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("uri", ["9", "camera9", "/dev/video9"])
def test_camera_uris_mean_a_device_and_a_missing_camera_fails_fast(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "9").write_bytes(b"a file that must never be opened as a video")
    start = time.perf_counter()
    with pytest.raises(SourceError, match="camera 9"):
        open_source(uri, Config())
    assert time.perf_counter() - start < 5.0


def test_camera_open_that_hangs_gives_up_after_open_timeout(monkeypatch):
    def hanging_capture(*args):
        time.sleep(10)

    monkeypatch.setattr(sources.cv2, "VideoCapture", hanging_capture)
    start = time.perf_counter()
    with pytest.raises(SourceError, match="did not open within 0.3 s"):
        CameraSource(0, SourceConfig(open_timeout_s=0.3))
    assert time.perf_counter() - start < 1.5


class FakeCapture:
    """cv2.VideoCapture double delivering ``count`` frames at ``fps``, then failing reads."""

    def __init__(self, count: int, fps: float = 200.0) -> None:
        self.count, self.fps, self.index = count, fps, 0
        self.released = False

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return True

    def read(self):
        time.sleep(1.0 / self.fps)
        if self.index >= self.count:
            return False, None
        self.index += 1
        return True, np.full((8, 8, 3), self.index, np.uint8)

    def release(self) -> None:
        self.released = True


def test_camera_is_live_delivers_frames_and_reports_a_lost_device(monkeypatch):
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda *args: FakeCapture(5))
    with CameraSource(0, SourceConfig()) as camera:
        assert camera.live and camera.info.kind == "camera"
        first = camera.read()
        assert first.image.shape == (8, 8, 3) and first.index == 0
        with pytest.raises(SourceError, match="camera 0 stopped delivering frames"):
            while True:
                camera.read()


def test_camera_captures_nothing_before_the_first_read(monkeypatch):
    captures: list[FakeCapture] = []

    def open_capture(*args):
        captures.append(FakeCapture(100))
        return captures[-1]

    monkeypatch.setattr(sources.cv2, "VideoCapture", open_capture)
    with CameraSource(0, SourceConfig()) as camera:
        time.sleep(0.1)  # the model loads meanwhile: frames read now would only be dropped
        assert captures[0].index == 0 and camera.frames_dropped == 0
        assert camera.read().index == 0
    unread = CameraSource(0, SourceConfig())
    unread.close()
    unread.close()  # idempotent
    assert captures[1].released and captures[1].index == 0


def test_camera_read_returns_end_promptly_when_stopped(monkeypatch):
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda *args: FakeCapture(10**6, fps=2.0))
    stop = threading.Event()
    with CameraSource(0, SourceConfig()) as camera:
        threading.Timer(0.2, stop.set).start()
        start = time.perf_counter()
        while not isinstance(camera.read(stop), EndOfStream):
            pass
        assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("uri, message", [
    ("", "empty source; give a camera, file, folder, glob, URL or synthetic"),
    ("  ", "empty source; give a camera, file, folder, glob, URL or synthetic"),
    ("foo://x", "unknown source scheme 'foo://'"),
    ("/definitely/not/here.mp4", "no such file or folder"),
    ("/definitely/not/*.png", "no images match"),
])
def test_bad_uris_raise_a_clear_source_error(uri, message):
    with pytest.raises(SourceError, match=message):
        open_source(uri, Config())


def test_empty_folder_and_replay_of_a_live_source_are_errors(tmp_path):
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path), Config())
    with pytest.raises(SourceError, match="live source"):
        open_source("camera0", Config(), realtime=False)


def test_file_that_is_no_video_is_an_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a video")
    with pytest.raises(SourceError, match="notes.txt"):
        open_source(str(path), Config())


# -- video files ---------------------------------------------------------------------------------------

def test_video_file_reads_every_frame_and_ends_by_read_failure(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, 12)
    source = open_source(str(path), Config())
    assert isinstance(source, VideoFileSource) and not source.live
    frames = read_all(source)
    assert [f.index for f in frames] == list(range(12))
    assert frames[0].image.shape == (48, 64, 3)
    assert isinstance(source.read(), EndOfStream)
    assert all(b.timestamp >= a.timestamp for a, b in zip(frames, frames[1:], strict=False))


def test_truncated_video_warns_once_how_far_it_got(tmp_path, caplog):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for index in range(20):
        writer.write(np.full((48, 64, 3), index * 10, np.uint8))
    writer.release()
    with caplog.at_level("WARNING"), VideoFileSource(path) as source:
        assert len(read_all(source)) == 20
    assert "declared" not in caplog.text
    cut = tmp_path / "cut.avi"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    with VideoFileSource(cut) as source:
        kept = len(read_all(source))
    assert 0 < kept < 20
    warnings = [r.getMessage() for r in caplog.records if "declared" in r.getMessage()]
    assert warnings == [f"{cut}: video ended after {kept} of 20 frames declared"]
    caplog.clear()
    with VideoFileSource(cut, loop=True) as source:
        assert len(read_all(source, limit=5 * kept)) == 5 * kept
    assert sum("declared" in r.getMessage() for r in caplog.records) == 1


def test_video_file_loop_restarts_at_the_end(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, 4)
    with VideoFileSource(path, loop=True) as source:
        frames = read_all(source, limit=10)
    assert len(frames) == 10 and [f.index for f in frames] == list(range(10))


@pytest.mark.skipif(not VTEST.exists(), reason=f"sample video {VTEST} not present (set CELLSEG_SAMPLE_VIDEO)")
def test_real_h264_video_ends_by_read_failure_not_container_count():
    reference = cv2.VideoCapture(str(VTEST))
    decodable = 0
    while reference.read()[0]:
        decodable += 1
    with open_source(str(VTEST), Config()) as source:
        frames = 0
        for frame in source:
            frames += 1
            assert frame.image.shape == (720, 1280, 3)
        claimed = source.info.frame_count
    assert frames == decodable > 0
    # The container claims more frames than it holds: reading past the claim would hang or fail.
    assert claimed is not None and claimed != frames


# -- network streams -----------------------------------------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _MjpegCameraHandler(http.server.BaseHTTPRequestHandler):
    """An IP camera's MJPEG stream (multipart JPEGs, no frame count) that drops the connection after
    ``frames_per_connection`` frames, as a flaky network does."""

    frames_per_connection = 6

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        for index in range(self.frames_per_connection):
            ok, jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 30 * index, np.uint8))
            self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg))
            self.wfile.write(jpeg.tobytes() + b"\r\n")


def _serve(handler) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def http_server(tmp_path):
    """(server, url of a 6-frame MP4 recording, url of a live MJPEG camera that drops every 6 frames)."""
    write_video(tmp_path / "stream.mp4", 6)
    files, files_url = _serve(functools.partial(_QuietHandler, directory=str(tmp_path)))
    camera, camera_url = _serve(_MjpegCameraHandler)
    yield camera, f"{files_url}/stream.mp4", f"{camera_url}/live"
    for server in (files, camera):
        server.shutdown()
        server.server_close()


def test_stream_reconnects_with_backoff_and_gives_up_with_a_clear_error(http_server):
    server, _, url = http_server
    settings = SourceConfig(open_timeout_s=2.0, read_timeout_s=2.0, reconnect_attempts=2, reconnect_backoff_s=0.05)
    source = open_source(url, replace(Config(), source=vars(settings)))
    assert isinstance(source, StreamSource) and source.live and source.info.kind == "stream"
    try:
        frames = [source.read() for _ in range(9)]  # more than one connection delivers: a reconnect
        assert all(f.image.shape == (48, 64, 3) for f in frames)
        assert source.reconnects >= 1
        server.shutdown()
        server.server_close()
        start = time.perf_counter()
        with pytest.raises(SourceError, match="gave up after 2 reconnect attempts"):
            while True:
                source.read()
        assert time.perf_counter() - start < 5.0
    finally:
        source.close()


def test_recording_over_http_ends_at_its_last_frame_without_reconnecting(http_server):
    _, url, _ = http_server
    source = open_source(url, replace(Config(), source={"reconnect_attempts": 3, "reconnect_backoff_s": 0.05}))
    try:
        frames = []
        start = time.perf_counter()
        while not isinstance(frame := source.read(), EndOfStream):
            frames.append(frame)
            assert time.perf_counter() - start < 5.0
        assert len(frames) + source.frames_dropped == 6 and source.reconnects == 0
    finally:
        source.close()


def test_stream_that_never_answers_fails_within_open_timeout():
    with socket.socket() as silent:  # accepts connections, never sends a byte
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/live"
        start = time.perf_counter()
        with pytest.raises(SourceError, match="stream"):
            StreamSource(url, SourceConfig(open_timeout_s=0.5, read_timeout_s=0.5))
        assert time.perf_counter() - start < 3.0


# -- image sequences -----------------------------------------------------------------------------------

def test_natural_sort_orders_numbers_by_value():
    names = ["frame10.png", "frame2.png", "frame1.png", "Frame3.png"]
    assert sorted(names, key=natural_key) == ["frame1.png", "frame2.png", "Frame3.png", "frame10.png"]


def test_folder_is_read_in_natural_order(tmp_path):
    write_indexed_images(tmp_path, 12)
    with open_source(str(tmp_path), Config()) as source:
        frames = read_all(source)
    assert [int(f.image[0, 0]) for f in frames] == list(range(12))
    assert [f.index for f in frames] == list(range(12))
    assert source.info.frame_count == 12 and not source.live


def test_glob_and_formats_16_bit_png_tiff_jpeg(tmp_path):
    write_indexed_images(tmp_path / "deep", 3, dtype=np.uint16)
    write_indexed_images(tmp_path / "tif", 2, suffix=".tif", dtype=np.uint16)
    write_indexed_images(tmp_path / "jpg", 2, suffix=".jpg")
    with open_source(str(tmp_path / "deep" / "frame*.png"), Config()) as source:
        deep = read_all(source)
    assert len(deep) == 3 and deep[0].image.dtype == np.uint16 and deep[0].image.max() == 60000
    with open_source(str(tmp_path / "tif"), Config()) as source:
        tif = read_all(source)
    assert len(tif) == 2 and tif[0].image.dtype == np.uint16
    with open_source(str(tmp_path / "jpg"), Config()) as source:
        jpg = read_all(source)
    assert len(jpg) == 2 and jpg[0].image.dtype == np.uint8 and jpg[0].image.ndim == 2


@pytest.mark.parametrize("background", [False, True])
def test_a_folder_with_images_inside_reads_them_with_a_hint(tmp_path, caplog, background):
    """What app.synth writes (images/, masks/, background.png) replays as it is."""
    write_indexed_images(tmp_path / "seq" / "images", 3)
    write_indexed_images(tmp_path / "seq" / "masks", 5)
    if background:
        cv2.imwrite(str(tmp_path / "seq" / "background.png"), np.zeros((8, 8), np.uint8))
    with caplog.at_level("INFO", logger="app.pipeline.sources"), \
            open_source(str(tmp_path / "seq"), Config()) as source:
        assert [f.name for f in read_all(source)] == ["frame0.png", "frame1.png", "frame2.png"]
    (hint,) = [r.getMessage() for r in caplog.records]
    assert hint.startswith(f"{tmp_path / 'seq'}: reading the frames in {tmp_path / 'seq' / 'images'}")
    assert (f"add --background {tmp_path / 'seq' / 'background.png'}" in hint) == background
    caplog.clear()
    given = replace(Config(), preprocess={"background_file": str(tmp_path / "seq" / "background.png")})
    with caplog.at_level("INFO", logger="app.pipeline.sources"), open_source(str(tmp_path / "seq"), given):
        assert "--background" not in caplog.records[0].getMessage()  # already given


def test_corrupt_image_is_skipped_and_counted_or_fatal_when_strict(tmp_path, caplog):
    write_indexed_images(tmp_path, 6)
    (tmp_path / "frame3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated garbage")
    with open_source(str(tmp_path), Config()) as source:
        frames = read_all(source)
    assert [int(f.image[0, 0]) for f in frames] == [0, 1, 2, 4, 5]
    assert source.frames_skipped == 1
    assert "frame3.png" in caplog.text
    strict = replace(Config(), source={"strict": True})
    with open_source(str(tmp_path), strict) as source, pytest.raises(SourceError, match="frame3.png"):
        read_all(source)


def damaged_pngs(good: bytes) -> dict[str, bytes]:
    idat = good.index(b"IDAT")
    flipped = bytearray(good)
    flipped[idat + 20] ^= 0xFF  # inside the compressed pixels: libpng itself complains about these
    return {"flipped byte": bytes(flipped), "cut short": good[: len(good) // 2], "empty": b"",
            "garbage after the signature": b"\x89PNG\r\n\x1a\n truncated garbage", "no IEND": good[:-12]}


def test_png_damage_names_what_is_wrong(tmp_path):
    good = write_indexed_images(tmp_path, 1)[0].read_bytes()
    assert png_damage(good) is None
    reasons = {kind: png_damage(data) for kind, data in damaged_pngs(good).items()}
    assert reasons == {"flipped byte": "IDAT chunk fails its CRC", "cut short": "IDAT chunk cut short",
                       "empty": "no PNG signature", "garbage after the signature": "no IHDR chunk after the signature",
                       "no IEND": "cut short before the IEND chunk"}


@pytest.mark.parametrize("damage", ["flipped byte", "cut short", "empty", "garbage after the signature",
                                    "no IEND"])
def test_skipped_image_leaves_a_gap_frames_after_it_keep_index_and_name(tmp_path, caplog, capfd, damage):
    """A skipped 000003.png used to shift every later frame down by one (masks and CSV rows misnamed),
    and libpng printed its own raw error line next to our warning."""
    paths = write_indexed_images(tmp_path, 6)
    paths[3].write_bytes(damaged_pngs(paths[3].read_bytes())[damage])
    capfd.readouterr()
    with open_source(str(tmp_path), Config()) as source:
        frames = read_all(source)
    assert [f.index for f in frames] == [int(f.image[0, 0]) for f in frames] == [0, 1, 2, 4, 5]
    assert [f.name for f in frames] == ["frame0.png", "frame1.png", "frame2.png", "frame4.png", "frame5.png"]
    assert source.frames_skipped == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipping unreadable image" in warnings[0] and "frame3.png" in warnings[0]
    assert "libpng" not in capfd.readouterr().err


def test_looping_image_sequence_keeps_counting_and_video_frames_have_no_name(tmp_path):
    write_indexed_images(tmp_path / "images", 3)
    with open_source(str(tmp_path / "images"), replace(Config(), source={"loop": True})) as source:
        frames = read_all(source, limit=7)
    assert [f.index for f in frames] == list(range(7))
    assert [f.name for f in frames] == ["frame0.png", "frame1.png", "frame2.png"] * 2 + ["frame0.png"]
    write_video(tmp_path / "clip.mp4", 2)
    with open_source(str(tmp_path / "clip.mp4"), Config()) as source:
        assert [f.name for f in read_all(source)] == [None, None]


def test_prefetch_threads_deliver_in_order_with_bounded_look_ahead(tmp_path, monkeypatch):
    paths = write_indexed_images(tmp_path, 24)
    reads: list[Path] = []
    lock = threading.Lock()
    real_read = sources._read_image

    def slow_random_read(path):
        time.sleep(random.uniform(0.0, 0.01))  # finish out of order
        with lock:
            reads.append(path)
        return real_read(path)

    monkeypatch.setattr(sources, "_read_image", slow_random_read)
    with ImageSequenceSource(paths, str(tmp_path), prefetch_threads=4, prefetch_depth=5) as source:
        first = source.read()
        time.sleep(0.1)
        with lock:
            assert len(reads) <= 1 + 5  # never more than the look-ahead
        frames = [first, *read_all(source)]
    assert [int(f.image[0, 0]) for f in frames] == list(range(24))


# -- synthetic -----------------------------------------------------------------------------------------

def synth_config(fps: float, frames: int = 10) -> Config:
    return replace(Config(), synth={"size": 32, "frames": frames, "num_cells": 1, "num_particles": 0,
                                    "num_dust_rings": 0}, source={"fps": fps})


def test_synthetic_source_is_paced_like_a_camera():
    with open_source("synthetic", synth_config(fps=50.0)) as source:
        assert isinstance(source, SyntheticSource) and source.live
        start = time.perf_counter()
        frames = read_all(source)
        elapsed = time.perf_counter() - start
    assert len(frames) == 10 and frames[0].image.shape == (32, 32)
    assert 0.15 <= elapsed < 0.6  # 9 intervals of 20 ms
    gaps = np.diff([f.timestamp for f in frames])
    assert gaps.mean() == pytest.approx(0.02, abs=0.006)


def test_synthetic_source_read_late_skips_to_the_newest_frame_and_counts_drops():
    with open_source("synthetic", synth_config(fps=100.0, frames=1000)) as source:
        source.read()
        time.sleep(0.1)
        late = source.read()
    assert late.index >= 8
    assert source.frames_dropped == late.index - 1


def test_synthetic_replay_is_unpaced_with_file_semantics():
    with open_source("synthetic", synth_config(fps=1.0), realtime=False) as source:
        start = time.perf_counter()
        frames = read_all(source)
    assert len(frames) == 10 and not source.live
    assert time.perf_counter() - start < 1.0
    assert source.read() is END_OF_STREAM
    assert source.info.fps == 1.0  # the rate it is meant to play at, e.g. in an MP4 of it
