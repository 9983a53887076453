"""The browser preview with a real HTTP client: concurrent viewers, one that leaves mid-stream, one that
never reads, the page and its statistics, the record button, the address rules and shutdown."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest

from app import live, run
from app.config import ConfigError, OutputConfig, PreviewConfig, load_config
from app.pipeline.frames import Frame, SourceInfo
from app.pipeline.sinks import Rendered
from app.preview import PreviewError, PreviewServer, parse_address

pytestmark = pytest.mark.timeout(60)
CLASSES = ("background", "cell")
PALETTE = ((0, 0, 0), (0, 220, 0))
INFO = SourceInfo("synthetic", "synthetic", live=True)


def rendered(index: int, size: tuple[int, int] = (48, 64), noise: bool = False) -> Rendered:
    """A finished frame whose left half is class 1; ``noise``: an overlay JPEG cannot compress."""
    height, width = size
    labels = np.zeros(size, np.uint8)
    labels[:, : width // 2] = 1
    if noise:
        overlay = np.random.default_rng(index).integers(0, 256, (*size, 3), dtype=np.uint8)
    else:
        overlay = np.full((*size, 3), index % 256, np.uint8)
    frame = Frame(index, time.perf_counter(), overlay[..., 0], INFO)
    return Rendered(frame, labels, overlay, latency_ms=12.0)


class Feeder:
    """Writes frames to the sink from its own thread (the pipeline's sinks stage) at about ``fps``,
    recording how long each ``write`` took."""

    def __init__(self, sink, fps: float = 200.0, **frame_options) -> None:
        self.sink = sink
        self.interval_s = 1.0 / fps
        self.frame_options = frame_options
        self.write_s: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="test feeder")

    def _run(self) -> None:
        index = 0
        while not self.stop.is_set():
            item = rendered(index, **self.frame_options)
            start = time.perf_counter()
            self.sink.write(item)
            self.write_s.append(time.perf_counter() - start)
            index += 1
            self.stop.wait(self.interval_s)

    def __enter__(self) -> Feeder:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)


def preview_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("preview") and thread.is_alive()]


@pytest.fixture
def serve(tmp_path):
    """``serve(**preview settings) -> (server, sink)`` on a free loopback port; closed afterwards, and
    no preview thread may be left then."""
    servers = []

    def make(**settings):
        settings = {"address": "127.0.0.1:0", "record_dir": str(tmp_path / "recordings"), **settings}
        server = PreviewServer(PreviewConfig(**settings))
        servers.append(server)
        return server, server.open_sink(OutputConfig(video_fps=25.0), CLASSES, PALETTE)

    yield make
    for server in servers:
        server.sink.close()
    assert preview_threads() == []


def get(server, path: str, headers: dict | None = None) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def post_json(server, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def read_jpegs(response: http.client.HTTPResponse, count: int) -> list[bytes]:
    """The next ``count`` JPEG parts of an MJPEG response."""
    boundary = re.search(r"boundary=(\S+)", response.getheader("Content-Type")).group(1).encode()
    parts = []
    while len(parts) < count:
        line = response.fp.readline()
        if not line:
            break
        if line.strip() != b"--" + boundary:
            continue
        headers = {}
        while (line := response.fp.readline().strip()):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        assert headers["content-type"] == "image/jpeg"
        parts.append(response.fp.read(int(headers["content-length"])))
    return parts


def open_stream(server) -> http.client.HTTPResponse:
    """A viewer's MJPEG response; ``close()`` it to hang up."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=5)
    connection.request("GET", "/stream.mjpg")
    response = connection.getresponse()  # the connection hands its socket over to the response
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("multipart/x-mixed-replace")
    return response


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_three_concurrent_viewers_all_get_jpeg_frames(serve):
    server, sink = serve(max_fps=100.0)
    got: dict[int, list[bytes]] = {}
    connected = threading.Barrier(4, timeout=10)

    def viewer(number: int) -> None:
        response = open_stream(server)
        try:
            got[number] = read_jpegs(response, 2)
            connected.wait()  # all three are watching at once
            got[number] += read_jpegs(response, 3)
        finally:
            response.close()

    with Feeder(sink):
        viewers = [threading.Thread(target=viewer, args=(number,)) for number in range(3)]
        for thread in viewers:
            thread.start()
        connected.wait()
        watching = server.viewers
        for thread in viewers:
            thread.join(10)
    assert watching == 3
    assert sorted(got) == [0, 1, 2]
    for parts in got.values():
        assert len(parts) == 5
        images = [cv2.imdecode(np.frombuffer(part, np.uint8), cv2.IMREAD_COLOR) for part in parts]
        assert all(image is not None and image.shape == (48, 64, 3) for image in images)
    assert wait_until(lambda: server.viewers == 0)


def test_viewers_beyond_max_viewers_are_refused(serve):
    server, sink = serve(max_viewers=1)
    sink.write(rendered(0))
    first = open_stream(server)
    assert get(server, "/stream.mjpg")[0] == 503
    first.close()
    assert wait_until(lambda: server.viewers == 0)
    open_stream(server).close()


def test_a_viewer_that_disconnects_mid_stream_is_cleaned_up(serve):
    server, sink = serve(max_fps=100.0)
    with Feeder(sink) as feeder:
        response = open_stream(server)
        assert len(read_jpegs(response, 1)) == 1
        response.close()  # hangs up mid-stream
        assert wait_until(lambda: server.viewers == 0)
        response = open_stream(server)  # the next one is served as before
        assert len(read_jpegs(response, 2)) == 2
        response.close()
    assert sink.stats()["frames"] == len(feeder.write_s)  # every write went through
    assert wait_until(lambda: len(preview_threads()) == 1)  # only the server loop is left


def test_a_viewer_that_never_reads_does_not_slow_the_sink_or_grow_memory(serve):
    """A client with a tiny receive buffer that reads nothing: the sink's writes stay fast, memory stays
    flat, another viewer keeps getting frames, and the stalled one is dropped after the send timeout."""
    server, sink = serve(max_fps=200.0, send_timeout_s=0.5)
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((server.host, server.port))
    stalled.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    tracemalloc.start()
    try:
        with Feeder(sink, size=(240, 320), noise=True) as feeder:  # ~200 kB JPEGs fill the socket at once
            assert wait_until(lambda: server.viewers == 1)
            baseline = tracemalloc.get_traced_memory()[0]
            response = open_stream(server)
            frames_while_stalled = read_jpegs(response, 10)
            response.close()
            assert wait_until(lambda: server.viewers == 0, timeout_s=10)  # the stalled one was dropped
            grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
        stalled.close()
    assert len(frames_while_stalled) == 10
    assert max(feeder.write_s) < 0.25  # a write is microseconds; generous for a shared 2-core machine
    assert grown < 20 * 2**20


def test_page_assets_and_stats(serve):
    server, sink = serve()
    status, kind, page = get(server, "/")
    assert status == 200 and kind.startswith("text/html")
    assert b'src="/stream.mjpg"' in page
    for link in re.findall(rb'(?:src|href)="(/static/[^"]+)"', page):
        status, kind, body = get(server, link.decode())
        assert status == 200 and body, link
    assert get(server, "/nothing")[0] == 404
    waiting = json.loads(get(server, "/stats")[2])
    assert waiting["frames"] == 0 and waiting["classes"] == [] and waiting["ended"] is False
    for index in (0, 1, 2, 5, 6):  # indices 3 and 4 never arrived: dropped on the way
        sink.write(rendered(index))
    stats = json.loads(get(server, "/stats")[2])
    assert stats["frames"] == 5 and stats["frame_index"] == 6 and stats["frames_dropped"] == 2
    assert stats["fps"] > 0 and stats["latency_ms"] == pytest.approx(12.0)
    assert stats["size"] == [64, 48] and stats["source"] == "synthetic" and stats["viewers"] == 0
    assert [(entry["name"], entry["fraction"], entry["color"]) for entry in stats["classes"]] == \
        [("background", 0.5, [0, 0, 0]), ("cell", 0.5, [0, 220, 0])]
    assert stats["recording"]["active"] is False


def test_the_record_button_writes_a_playable_mp4(serve, tmp_path):
    server, sink = serve()
    assert post_json(server, "/record", b'{"recording": true}', "text/plain")[0] == 415
    assert post_json(server, "/record", b'{"recording": "yes"}')[0] == 400
    status, state = post_json(server, "/record", b'{"recording": true}')
    assert status == 200 and state["active"] is True
    path = Path(state["file"])
    assert path.parent == tmp_path / "recordings" and path.suffix == ".mp4"
    for index in range(12):
        sink.write(rendered(index))
    assert post_json(server, "/record", b'{"recording": true}')[1]["file"] == str(path)  # a second start: same file
    status, state = post_json(server, "/record", b'{"recording": false}')
    assert status == 200 and state == {"active": False, "file": None, "frames": 12, "last_saved": str(path),
                                       "error": None}
    sink.write(rendered(12))  # not recorded any more
    capture = cv2.VideoCapture(str(path))
    frames = 0
    while capture.read()[0]:
        frames += 1
    capture.release()
    assert frames == 12
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    assert json.loads(get(server, "/stats")[2])["recording"]["last_saved"] == str(path)


def test_a_recording_in_progress_is_finished_when_the_run_ends(serve):
    server, sink = serve()
    path = Path(post_json(server, "/record", b'{"recording": true}')[1]["file"])
    for index in range(5):
        sink.write(rendered(index))
    sink.close()
    assert path.is_file() and cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT) == 5
    assert preview_threads() == []


@pytest.mark.parametrize(("text", "address"), [("8080", ("127.0.0.1", 8080)), (":8080", ("127.0.0.1", 8080)),
                                               ("localhost:81", ("localhost", 81)), ("[::1]:9000", ("::1", 9000)),
                                               ("0.0.0.0:8080", ("0.0.0.0", 8080))])
def test_addresses_default_to_loopback(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["", "host", "127.0.0.1:", "127.0.0.1:99999", "[::1]"])
def test_a_bad_address_is_one_line(text):
    with pytest.raises(PreviewError, match=r"give \[HOST:\]PORT"):
        parse_address(text)


def test_it_binds_to_loopback_and_refuses_other_addresses_unless_asked(serve, tmp_path):
    server, _ = serve(address="0")
    assert server.http.socket.getsockname()[0] == "127.0.0.1"
    for address in ("0.0.0.0:0", "192.168.1.20:8080", "myhost.lan:8080"):
        with pytest.raises(PreviewError, match="--serve-public"):
            PreviewServer(PreviewConfig(address=address, record_dir=str(tmp_path)))
    public, _ = serve(address="0.0.0.0:0", public=True)
    assert public.http.socket.getsockname()[0] == "0.0.0.0"


def test_on_loopback_only_loopback_host_names_are_served(serve):
    """A page whose host name was made to resolve to 127.0.0.1 (DNS rebinding) gets nothing."""
    server, _ = serve()
    assert get(server, "/stats", {"Host": "evil.example:8080"})[0] == 403
    assert get(server, "/stream.mjpg", {"Host": "evil.example"})[0] == 403
    assert get(server, "/stats", {"Host": f"localhost:{server.port}"})[0] == 200
    public, _ = serve(address="0.0.0.0:0", public=True)
    assert get(public, "/stats", {"Host": "labpc.lan"})[0] == 200


def test_bad_preview_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="preview.jpeg_quality"):
        load_config(overrides=["preview.jpeg_quality=0"])
    with pytest.raises(ConfigError, match="preview.max_fps"):
        load_config(overrides=["preview.max_fps=0"])
    (tmp_path / "file").write_text("")
    with pytest.raises(PreviewError, match="preview.record_dir"):
        PreviewServer(PreviewConfig(address="0", record_dir=str(tmp_path / "file" / "recordings")))


def refuse_model(monkeypatch):
    """Make loading the model fail the test: the error must come before it."""
    def build_stages(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(run, "build_stages", build_stages)


def test_cli_refuses_a_public_address_before_the_model_loads(tiny_weights, monkeypatch, capsys, restore_signals):
    refuse_model(monkeypatch)
    code = live.main(["--weights", str(tiny_weights), "--no-display", "--serve", "0.0.0.0:8080"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1
    assert "0.0.0.0 is not a loopback address" in errors[0] and "--serve-public" in errors[0]


def test_cli_port_in_use_is_one_line_before_the_model_loads(tiny_weights, monkeypatch, capsys, restore_signals):
    refuse_model(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = live.main(["--weights", str(tiny_weights), "--no-display", "--serve", str(port)])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1
    assert f"port {port} is in use" in errors[0]
    assert preview_threads() == []


def test_closing_ends_a_stalled_stream_and_every_thread(serve):
    server, sink = serve(send_timeout_s=30.0)  # the send timeout alone would keep it for 30 s
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((server.host, server.port))
    stalled.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    with Feeder(sink, size=(240, 320), noise=True):
        assert wait_until(lambda: server.viewers == 1)
        time.sleep(0.3)  # its socket is full by now, its thread blocked in a send
    start = time.monotonic()
    sink.close()
    assert time.monotonic() - start < 5
    assert preview_threads() == []
    stalled.close()


def test_live_cli_serves_the_run_and_stops_the_server_on_ctrl_c(tiny_weights, tmp_path, monkeypatch,
                                                                 restore_signals):
    """``app.live --serve`` end to end: a real client reads the statistics of the running pipeline, then
    Ctrl-C ends the run (exit 130) and every preview thread with it."""
    servers: list[PreviewServer] = []
    open_sink = PreviewServer.open_sink

    def spy(self, *args, **kwargs):
        servers.append(self)
        return open_sink(self, *args, **kwargs)

    monkeypatch.setattr(PreviewServer, "open_sink", spy)
    seen: dict = {}

    def client() -> None:
        if wait_until(lambda: servers and servers[0].sink.stats()["frames"] >= 3, timeout_s=40):
            seen.update(json.loads(get(servers[0], "/stats")[2]))
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=client)
    watcher.start()
    code = live.main(["--weights", str(tiny_weights), "--no-display", "--source", "synthetic",
                      "--serve", "127.0.0.1:0", "--set", "synth.size=64", "--set", "source.loop=true",
                      "--set", f"preview.record_dir={tmp_path}"])
    watcher.join(10)
    assert code == 130
    assert seen["frames"] >= 3 and seen["size"] == [64, 64] and seen["ended"] is False
    assert [entry["name"] for entry in seen["classes"]] == list(CLASSES)
    assert preview_threads() == []


def test_the_preview_benchmark_runs_every_condition(tiny_weights, tmp_path):
    """``benchmarks.preview`` on tiny settings: every condition measured, the three viewers fed, the
    target evaluated, nothing left running."""
    from benchmarks import preview
    from benchmarks.workload import Context, FrameCache, load_model

    config = load_config(overrides=[f"model.weights={tiny_weights}", "benchmark.end_to_end_size=96",
                                    "benchmark.repeats=1", "benchmark.warmup=0", "preview.max_fps=200"])
    ctx = Context(config, load_model(config), FrameCache(tmp_path), tmp_path)
    section = preview.run_section(ctx, frames=40)
    assert list(section["conditions"]) == list(preview.CONDITIONS)
    for entry in section["conditions"].values():
        assert entry["median_fps"] > 0 and len(entry["runs"]) == 1
    assert all(count["frames"] > 0 for count in section["conditions"]["3 viewers"]["runs"][0]["viewers_received"])
    assert preview.targets(section)[0]["name"].startswith("browser preview")
    assert preview_threads() == []
