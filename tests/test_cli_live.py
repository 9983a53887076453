"""The live and replay CLIs end to end with a real tiny checkpoint: outputs, Ctrl-C, bad input."""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from app import live, replay, run
from tests.pipeline_helpers import VTEST, count_video_frames, read_gif, write_indexed_images

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[1]
SMALL_SYNTH = ["--set", "synth.size=64", "--set", "synth.num_cells=2", "--set", "synth.num_particles=1",
               "--set", "synth.num_dust_rings=1"]


def run_cli(module: str, *args: str, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_live_synthetic_writes_every_output_and_a_summary(tiny_weights, tmp_path):
    outputs = tmp_path / "out"
    result = run_cli("app.live", "--weights", str(tiny_weights), "--no-display", *SMALL_SYNTH,
                     "--set", "synth.frames=100", "--max-frames", "10", "--set", "output.gif_stride=1",
                     "--out", str(outputs / "x.mp4"), "--gif", str(outputs / "x.gif"),
                     "--masks", str(outputs / "masks"), "--csv", str(outputs / "x.csv"),
                     "--stats", str(outputs / "stats.json"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "inference" in result.stderr and "threaded:" in result.stderr
    stats = json.loads((outputs / "stats.json").read_text())
    frames = stats["frames"]
    # The camera-like source skips the frames due while the model warms up; it reads until 10 came out.
    assert stats["stopped"] == "max_frames" and stats["source"]["frames_read"] >= 10
    assert frames == 10 and stats["latency"]["p50_ms"] > 0
    assert set(stats["stats"]) == {"source", "preprocess", "inference", "overlay", "sinks"}
    assert count_video_frames(outputs / "x.mp4") == (frames, (64, 64))
    assert len(read_gif(outputs / "x.gif")) == frames
    assert len(list((outputs / "masks").glob("*.png"))) == frames
    header = (outputs / "x.csv").read_text().splitlines()[0]
    assert header == "frame,time_s,latency_ms,components,background,cell"


@pytest.mark.timeout(40)
def test_sigint_stops_live_within_two_seconds_with_playable_outputs(tiny_weights, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("DISPLAY", None)
    command = [sys.executable, "-m", "app.live", "--weights", str(tiny_weights), "--no-display", *SMALL_SYNTH,
               "--set", "synth.frames=3000", "--out", str(tmp_path / "x.mp4"), "--gif", str(tmp_path / "x.gif")]
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while "Ctrl-C to stop" not in lines.get(timeout=max(0.1, deadline - time.monotonic())):
            pass
        time.sleep(1.0)  # let frames reach the writers
        assert process.poll() is None, "live exited on its own"
        process.send_signal(signal.SIGINT)
        start = time.monotonic()
        process.wait(timeout=10)
        elapsed = time.monotonic() - start
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=5)
    rest = "".join(lines.queue)
    assert elapsed < 2.0
    assert process.returncode == 130
    assert "Traceback" not in rest and "(interrupted)" in rest
    frames, size = count_video_frames(tmp_path / "x.mp4")
    assert frames > 0 and size == (64, 64)
    assert len(read_gif(tmp_path / "x.gif")) >= 1
    assert not list(tmp_path.glob(".*partial*"))


def test_missing_camera_fails_within_five_seconds_with_one_line(tiny_weights):
    start = time.monotonic()
    result = run_cli("app.live", "--weights", str(tiny_weights), "--no-display", "--source", "camera9")
    assert time.monotonic() - start < 5.0
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "camera 9")


@pytest.mark.parametrize("extra, fragments", [
    (["--source", "/no/such/video.mp4"], ["no such file or folder", "/no/such/video.mp4"]),
    (["--source", "foo://x"], ["unknown source scheme 'foo://'"]),
    (["--num-classes", "3"], ["2 classes", "expected 3"]),
    (["--set", "pipeline.queue_sise=2"], ["did you mean 'pipeline.queue_size'"]),
])
def test_bad_input_is_one_line_and_exit_2(tiny_weights, capsys, restore_signals, extra, fragments):
    code = live.main(["--weights", str(tiny_weights), "--no-display", *extra])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)


def test_a_bad_source_is_reported_before_the_model_is_loaded(tmp_path, capsys, restore_signals):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    code = live.main(["--weights", str(garbage), "--no-display", "--source", "foo://x"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "unknown source scheme")


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/live"


def test_unreachable_stream_is_one_line_without_ffmpeg_noise(tiny_weights):
    start = time.monotonic()
    result = run_cli("app.live", "--weights", str(tiny_weights), "--no-display", "--source", closed_port_url())
    assert time.monotonic() - start < 5.0
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert_one_line_error(result.stderr, "could not be opened")


def test_stream_that_never_answers_is_a_clean_exit_after_the_open_timeout(tiny_weights):
    with socket.socket() as silent:  # accepts connections, never sends a byte
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/live"
        result = run_cli("app.live", "--weights", str(tiny_weights), "--no-display", "--source", url,
                         "--set", "source.open_timeout_s=0.5")
    assert result.returncode == 2, result.stderr  # not an abort (-6) from an abandoned open call
    assert result.stderr.count("\n") == 1, result.stderr
    assert_one_line_error(result.stderr, "could not be opened")


def test_corrupt_image_with_strict_is_one_error_line_without_opencv_noise(tiny_weights, tmp_path):
    write_indexed_images(tmp_path / "seq", 4)
    (tmp_path / "seq" / "frame2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated garbage")
    result = run_cli("app.replay", str(tmp_path / "seq"), "--weights", str(tiny_weights),
                     "--gif", str(tmp_path / "x.gif"), "--set", "source.strict=true")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "source stage failed", "frame2.png")
    assert not [line for line in result.stderr.splitlines() if line.startswith("[")], result.stderr


def test_missing_weights_suggest_the_flag(tmp_path, capsys, restore_signals):
    code = live.main(["--weights", str(tmp_path / "none.pt"), "--no-display"])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "weights file not found", "--weights")


def test_replay_writes_the_default_overlay_gif_without_dropping(tiny_weights, tmp_path, monkeypatch, capsys,
                                                              restore_signals):
    write_indexed_images(tmp_path / "dish3", 12)
    monkeypatch.chdir(tmp_path)
    code = replay.main([str(tmp_path / "dish3"), "--weights", str(tiny_weights),
                        "--csv", "dish3.jsonl", "--stats", "stats.json"])
    assert code == 0, capsys.readouterr().err
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["frames"] == 12 and stats["frames_dropped"] == 0
    assert len((tmp_path / "dish3.jsonl").read_text().splitlines()) == 12
    code = replay.main([str(tmp_path / "dish3"), "--weights", str(tiny_weights), "--sequential"])
    assert code == 0
    gif = tmp_path / "out" / "dish3_overlay.gif"
    assert len(read_gif(gif)) == math.ceil(12 / 2)  # default gif_stride 2
    assert "sequential:" in capsys.readouterr().err


@pytest.mark.skipif(not VTEST.exists(), reason=f"sample video {VTEST} not present (set CELLSEG_SAMPLE_VIDEO)")
def test_replay_of_a_real_video_to_mp4(tiny_weights, tmp_path, capsys, restore_signals):
    code = replay.main([str(VTEST), "--weights", str(tiny_weights), "--max-frames", "3",
                        "--out", str(tmp_path / "vtest.mp4")])
    assert code == 0, capsys.readouterr().err
    assert count_video_frames(tmp_path / "vtest.mp4") == (3, (720, 1280))


@pytest.mark.parametrize("module", [live, replay])
def test_help_explains_every_option(module, capsys):
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--weights", "--backend", "--num-classes", "--out", "--gif", "--masks", "--csv", "--stats",
                 "--max-frames", "--config", "--set", "--sequential"):
        assert flag in text
    assert ("--no-display" in text) if module is live else ("--display" in text)


def test_display_is_off_without_a_display_server(monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("display detection by environment applies to Linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    available, reason = run.display_available()
    assert not available and "DISPLAY" in reason
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(run.cv2, "getBuildInformation", lambda: "  GUI:   NONE\n")
    available, reason = run.display_available()
    assert not available and "without a GUI" in reason


def test_window_without_highgui_switches_itself_off(monkeypatch, caplog):
    def no_gui(*args):
        raise cv2.error("The function is not implemented. Rebuild the library with GUI support")

    monkeypatch.setattr(run.cv2, "namedWindow", no_gui)
    window = run.WindowDisplay("test")
    frame = np.zeros((8, 8, 3), np.uint8)
    assert window.show(frame) and window.show(frame)
    assert caplog.text.count("window off") == 1


def test_a_source_that_fails_mid_run_still_writes_its_stats(tiny_weights, tmp_path):
    write_indexed_images(tmp_path / "seq", 5)
    (tmp_path / "seq" / "frame3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated garbage")
    stats = tmp_path / "stats.json"
    result = run_cli("app.replay", str(tmp_path / "seq"), "--weights", str(tiny_weights), "--gif",
                     str(tmp_path / "x.gif"), "--stats", str(stats), "--set", "source.strict=true")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "source stage failed", "frame3.png")
    summary = json.loads(stats.read_text())
    assert summary["stopped"].startswith("failed: source stage failed") and summary["frames"] <= 3
    assert set(summary["stats"]) == {"source", "preprocess", "inference", "overlay", "sinks"}
    assert summary["config"]["source"] == str(tmp_path / "seq")
