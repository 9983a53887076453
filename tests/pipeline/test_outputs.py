"""Outputs under stress: a full disk, FIFOs, devices and symbolic links as outputs, bad paths found before
the first frame, and a GIF that finishes in milliseconds however long it is."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from app import files, live, replay
from app.errors import EXIT_FAILURE, EXIT_USAGE
from app.files import OutputError, partial_path, write_text
from app.pipeline.frames import Frame, SourceInfo
from app.pipeline.sinks import FrameStatsSink, GifSink, MaskFolderSink, Rendered, SinkError, VideoSink
from tests.pipeline_helpers import count_video_frames, read_gif, write_indexed_images

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
INFO = SourceInfo("test", "images", live=False)
CLASSES = ["background", "cell"]


def rendered(count: int, size: int = 64, seed: int = 0) -> list[Rendered]:
    """Overlays with a moving disc on mild noise (they compress like real ones, not to nothing)."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        overlay = rng.integers(90, 130, (size, size, 3), dtype=np.uint8)
        labels = np.zeros((size, size), np.uint8)
        cv2.circle(labels, (size // 4 + index % (size // 2), size // 2), size // 6, 1, -1)
        overlay[labels > 0] = (40, 200, 40)
        out.append(Rendered(Frame(index, time.perf_counter(), overlay[:, :, 0], INFO), labels, overlay, 5.0))
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*partial*"))


def mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                            text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: the disk fills after a few frames."""
    folder = tmp_path / "disk"
    mount_tmpfs(folder, "size=256k")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: even while a failed test holds a file


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount_tmpfs(folder, "ro,size=64k")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: even while a failed test holds a file


def fill(folder: Path, leave_bytes: int) -> None:
    """Fill ``folder``'s file system up to ``leave_bytes`` free."""
    with open(folder / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, files.free_bytes(folder) - leave_bytes))


def write_until_full(sink, items: list[Rendered]) -> SinkError | None:
    """Write until the sink stops the run (as the pipeline would), then close it; the first error."""
    error = None
    try:
        for item in items:
            sink.write(item)
    except SinkError as exc:
        error = exc
    try:
        sink.close()
    except SinkError as exc:
        error = error or exc
    return error


# -- item 1: a full disk --------------------------------------------------------------------------------------
def test_video_on_a_full_disk_fails_and_leaves_a_playable_file_or_none(small_disk):
    sink = VideoSink(small_disk / "x.mp4")
    error = write_until_full(sink, rendered(60, size=256))
    assert error is not None and "x.mp4" in str(error) and "\n" not in str(error)
    assert leftovers(small_disk) == []
    if (small_disk / "x.mp4").exists():  # stopped in time: every frame written is there
        assert count_video_frames(small_disk / "x.mp4")[0] == sink.frames > 0


def test_gif_on_a_full_disk_stops_with_a_readable_gif_of_the_frames_so_far(small_disk):
    sink = GifSink(small_disk / "x.gif", stride=1, scale=1.0, max_frames=500)
    error = write_until_full(sink, rendered(80, size=160))
    assert error is not None and "x.gif" in str(error) and "no space left" in str(error)
    assert leftovers(small_disk) == []
    assert len(read_gif(small_disk / "x.gif")) == sink.frames > 0


def test_masks_on_a_full_disk_fail_without_empty_pngs(small_disk):
    sink = MaskFolderSink(small_disk / "m")
    items = rendered(120, size=96)
    error = write_until_full(sink, items)
    assert error is not None and "no space left" in str(error)
    pngs = sorted((small_disk / "m").glob("*.png"))
    assert len(pngs) == sink.frames > 0 and leftovers(small_disk) == []
    for png in pngs:
        np.testing.assert_array_equal(cv2.imread(str(png), cv2.IMREAD_UNCHANGED), items[int(png.stem)].labels)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_table_on_a_nearly_full_disk_fails_clearly_and_leaves_no_temporary_file(small_disk, suffix):
    fill(small_disk, 24 * 1024)  # room for a few buffered rows, not for the flush
    path = small_disk / f"x{suffix}"
    try:
        sink = FrameStatsSink(path, CLASSES)
    except SinkError as exc:  # refused as it opens: the disk is full already
        error: SinkError | None = exc
    else:
        error = write_until_full(sink, rendered(400, size=32))
    assert error is not None and path.name in str(error)
    assert leftovers(small_disk) == [] and not path.exists()


def test_text_on_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(small_disk):
    fill(small_disk, 96 * 1024)
    with pytest.raises(OutputError, match=r"stats\.json.*(No space left|no space left)"):
        write_text(small_disk / "stats.json", "x" * 200_000)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_replay_on_a_full_disk_exits_1_with_one_line_and_no_broken_files(tiny_weights, tmp_path, small_disk):
    (tmp_path / "seq").mkdir()
    for item in rendered(40, size=256):  # noisy frames: every output outgrows the disk
        assert cv2.imwrite(str(tmp_path / "seq" / f"{item.frame.index:03d}.png"), item.overlay)
    result = subprocess.run(
        [sys.executable, "-m", "app.replay", str(tmp_path / "seq"), "--weights", str(tiny_weights), "-q",
         "--set", "output.gif_stride=1", "--set", "output.gif_scale=1",
         "--out", str(small_disk / "x.mp4"), "--gif", str(small_disk / "x.gif"), "--masks", str(small_disk / "m"),
         "--csv", str(small_disk / "x.csv")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=50)
    assert result.returncode == EXIT_FAILURE, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(small_disk) in errors[0] and "Traceback" not in result.stderr, result.stderr
    assert leftovers(small_disk) == []
    if (small_disk / "x.mp4").exists():
        assert count_video_frames(small_disk / "x.mp4")[0] > 0
    if (small_disk / "x.gif").exists():
        assert len(read_gif(small_disk / "x.gif")) > 0
    assert all(png.stat().st_size > 0 for png in (small_disk / "m").glob("*.png"))
    if (small_disk / "x.csv").exists():
        assert (small_disk / "x.csv").read_text().endswith("\n")


def test_a_synthetic_sequence_on_a_full_disk_fails_naming_the_file_without_empty_pngs(small_disk):
    from app.config import SynthConfig
    from app.synthesis import make_sequence
    from app.synthesis.writer import write_sequence

    with pytest.raises(OutputError, match=r"\.png: no space left on the disk"):
        write_sequence(make_sequence(SynthConfig(size=64, frames=200)), small_disk / "seq")
    pngs = list((small_disk / "seq").rglob("*.png"))
    assert pngs and all(png.stat().st_size > 0 for png in pngs) and leftovers(small_disk) == []


# -- item 2 (part): the GIF is written as frames arrive, close() only finishes it ------------------------------
def test_gif_frames_reach_the_disk_as_they_arrive_and_close_is_quick(tmp_path):
    items = rendered(60, size=256)
    sink = GifSink(tmp_path / "big.gif", fps=10, stride=1, scale=1.0, max_frames=120)
    start = time.perf_counter()
    for item in items:
        sink.write(item)
    writing = time.perf_counter() - start
    before_close = partial_path(tmp_path / "big.gif").stat().st_size
    start = time.perf_counter()
    sink.close()
    closing = time.perf_counter() - start
    assert before_close == (tmp_path / "big.gif").stat().st_size - 1  # all but the trailer byte was on disk
    assert closing < max(0.2, writing / 4), (closing, writing)  # encoding everything in close() is ~ writing × 10
    animation = cv2.Animation()
    animation.frames = [item.overlay for item in items]
    animation.durations = [100] * len(items)
    animation.loop_count = 0
    ok, whole = cv2.imencodeanimation(".gif", animation)
    assert ok and (tmp_path / "big.gif").read_bytes() == whole.tobytes()  # what OpenCV writes in one go


# -- item 4: FIFOs, devices, symbolic links -------------------------------------------------------------------
def read_fifo_in_thread(fifo: Path) -> tuple[threading.Thread, list[str]]:
    lines: list[str] = []

    def read() -> None:
        with open(fifo) as handle:
            lines.extend(handle.read().splitlines())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, lines


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_table_streams_into_a_fifo_and_leaves_it_a_fifo(tmp_path, suffix):
    fifo = tmp_path / f"rows{suffix}"
    os.mkfifo(fifo)
    reader, lines = read_fifo_in_thread(fifo)
    sink = FrameStatsSink(fifo, CLASSES)
    for item in rendered(5):
        sink.write(item)
    sink.close()
    reader.join(timeout=5)
    assert not reader.is_alive(), "the FIFO's reader never got end of file"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and leftovers(tmp_path) == []
    if suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    else:
        rows = [json.loads(line) for line in lines]
    assert [int(row["frame"]) for row in rows] == [0, 1, 2, 3, 4]


def test_a_fifo_nobody_reads_fails_clearly_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "STREAM_OPEN_TIMEOUT_S", 0.2)
    os.mkfifo(tmp_path / "rows.csv")
    with pytest.raises(SinkError, match="no process read the FIFO"):
        FrameStatsSink(tmp_path / "rows.csv", CLASSES)


@pytest.mark.parametrize("make", [lambda p: VideoSink(p / "out.mp4"), lambda p: GifSink(p / "out.gif")])
def test_formats_that_need_a_regular_file_refuse_a_fifo(tmp_path, make):
    for name in ("out.mp4", "out.gif"):
        os.mkfifo(tmp_path / name)
    with pytest.raises(SinkError, match="it is a FIFO, and this format needs a regular file"):
        make(tmp_path)
    assert all(stat.S_ISFIFO(os.lstat(tmp_path / name).st_mode) for name in ("out.mp4", "out.gif"))


def test_a_fifo_in_the_mask_folder_is_refused_not_replaced(tmp_path):
    (tmp_path / "m").mkdir()
    os.mkfifo(tmp_path / "m" / "000001.png")
    sink = MaskFolderSink(tmp_path / "m")
    items = rendered(2)
    sink.write(items[0])
    with pytest.raises(SinkError, match="000001.png: it is a FIFO"):
        sink.write(items[1])
    assert stat.S_ISFIFO(os.lstat(tmp_path / "m" / "000001.png").st_mode) and leftovers(tmp_path) == []
    with pytest.raises(SinkError, match="not a folder"):
        MaskFolderSink(tmp_path / "m" / "000001.png")


def test_a_link_to_a_character_device_is_written_through(tmp_path):
    link = tmp_path / "rows.jsonl"
    link.symlink_to("/dev/null")
    sink = FrameStatsSink(link, CLASSES)
    sink.write(rendered(1)[0])
    sink.close()
    assert os.readlink(link) == "/dev/null" and leftovers(tmp_path) == []
    video = tmp_path / "v.mp4"
    video.symlink_to("/dev/null")
    with pytest.raises(SinkError, match="it is a character device"):
        VideoSink(video)
    assert os.readlink(video) == "/dev/null"


def test_a_descriptor_path_writes_into_that_descriptor(tmp_path):
    read_end, write_end = os.pipe()
    try:
        sink = FrameStatsSink(f"/dev/fd/{write_end}", CLASSES)
        for item in rendered(3):
            sink.write(item)
        sink.close()
        os.close(write_end)
        with os.fdopen(read_end) as handle:
            rows = [json.loads(line) for line in handle.read().splitlines()]
    finally:
        for fd in (read_end, write_end):
            try:
                os.close(fd)
            except OSError:
                pass
    assert [row["frame"] for row in rows] == [0, 1, 2]


def test_live_streams_rows_to_a_link_to_stdout_without_replacing_it(tiny_weights, tmp_path, capfd, restore_signals):
    link = tmp_path / "rows.csv"
    link.symlink_to("/dev/stdout")
    code = live.main(["--weights", str(tiny_weights), "--no-display", "-q", "--set", "synth.size=64",
                      "--max-frames", "4", "--csv", str(link)])
    out = capfd.readouterr().out
    assert code == 0
    assert os.readlink(link) == "/dev/stdout" and leftovers(tmp_path) == []
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) >= 1 and list(rows[0])[:4] == ["frame", "time_s", "latency_ms", "components"]


@pytest.mark.parametrize("name, make", [
    ("out.mp4", lambda p: VideoSink(p)),
    ("out.gif", lambda p: GifSink(p, stride=1)),
    ("out.csv", lambda p: FrameStatsSink(p, CLASSES)),
])
def test_a_symbolic_link_is_followed_and_stays_a_link(tmp_path, name, make):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / name
    target.write_bytes(b"old")
    link = tmp_path / name
    link.symlink_to(target)
    sink = make(link)
    for item in rendered(3):
        sink.write(item)
    sink.close()
    assert link.is_symlink() and Path(os.readlink(link)) == target
    assert leftovers(tmp_path) == []
    if name.endswith(".mp4"):
        assert count_video_frames(target)[0] == 3
    elif name.endswith(".gif"):
        assert len(read_gif(target)) == 3
    else:
        assert len(target.read_text().splitlines()) == 4


def test_a_dangling_link_creates_its_target(tmp_path):
    link = tmp_path / "stats.json"
    link.symlink_to(tmp_path / "later" / "stats.json")
    write_text(link, "{}\n")
    assert link.is_symlink() and (tmp_path / "later" / "stats.json").read_text() == "{}\n"


# -- item 6: every output checked before the first frame ------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda p: GifSink(p / "g.xyz"), "extension must be .gif, not '.xyz'"),
    (lambda p: VideoSink(p / "v.gif"), "extension must be .mp4 or .m4v or .mov or .avi or .mkv"),
    (lambda p: FrameStatsSink(p / "s.txt", CLASSES), "extension must be .csv or .jsonl or .ndjson"),
    (lambda p: VideoSink(p), "it is a folder, not a file"),
    (lambda p: FrameStatsSink(p / "f" / "s.csv", CLASSES), "f is not a folder"),
    (lambda p: MaskFolderSink(p / "f"), "it is not a folder"),
])
def test_bad_output_paths_fail_as_the_sink_opens(tmp_path, make, message):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(SinkError, match=message) as caught:
        make(tmp_path)
    assert caught.value.exit_code == EXIT_USAGE and "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize("flag, name, message", [
    ("--gif", "g.xyz", "extension must be .gif"),
    ("--stats", "stats.txt", "extension must be .json"),
    ("--out", "", "it is a folder"),
])
def test_replay_checks_outputs_before_the_first_frame(tiny_weights, tmp_path, capsys, monkeypatch, restore_signals,
                                                     flag, name, message):
    monkeypatch.chdir(tmp_path)
    write_indexed_images(tmp_path / "seq", 3)
    target = tmp_path / name if name else tmp_path
    code = replay.main([str(tmp_path / "seq"), "--weights", str(tiny_weights), flag, str(target)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and str(target) in errors[0], err
    assert "threaded:" not in err  # no frame was processed


def test_stats_in_a_read_only_folder_fail_before_the_run(tiny_weights, read_only_folder, capsys, restore_signals):
    start = time.perf_counter()
    code = live.main(["--weights", str(tiny_weights), "--no-display", "--set", "synth.size=64",
                      "--max-frames", "3", "--stats", str(read_only_folder / "stats.json")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and time.perf_counter() - start < 5
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"cannot write to folder {read_only_folder}" in errors[0], err
    assert "PermissionError" not in err and "threaded:" not in err
