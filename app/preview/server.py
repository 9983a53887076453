"""The browser preview's HTTP server (standard library ``http.server``), one thread per connection.

Routes: ``GET /`` the page, ``GET /static/NAME`` its script and style sheet (package files under
``app/preview/static/``), ``GET /stream.mjpg`` the overlay as MJPEG (``multipart/x-mixed-replace``),
``GET /stats`` the live statistics as JSON, ``POST /record`` with ``{"recording": true|false}``
(``Content-Type: application/json``, which a cross-site form cannot send) to start or stop the MP4.

Viewers never slow the pipeline: each viewer thread sends the newest JPEG it has not sent yet
(:meth:`~app.preview.sink.PreviewSink.next_jpeg`) and skips the rest; a viewer that does not take a
frame within ``preview.send_timeout_s`` (it stopped reading) or that went away is dropped, and at most
``preview.max_viewers`` streams run at once. :meth:`PreviewServer.close` stops the server, ends every
stream and joins every thread it started (with a timeout).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import select
import socket
import socketserver
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from app.errors import AppError, first_line
from app.files import OutputError, check_folder
from app.pipeline.sinks import SinkError
from app.preview.sink import PreviewSink

if TYPE_CHECKING:
    from app.config import OutputConfig, PreviewConfig

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
BOUNDARY = "frame"
JOIN_TIMEOUT_S = 2.0
IDLE_CHECK_S = 0.5
"""How often a stream with no new frame checks that its viewer is still connected (seconds)."""
SEND_BUFFER_BYTES = 128 * 1024
"""Kernel send buffer per connection (instead of autotuning up to megabytes): bounds what a viewer that
stops reading pins in memory, and makes it block, then time out, within a few frames."""
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}


class PreviewError(AppError):
    """The preview cannot serve on the address asked for (bad address, not loopback without
    ``--serve-public``, port in use); one line, exit 2, raised before the model loads."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (``[::1]:PORT`` for IPv6) -> ``(host, port)``; no host means
    :data:`LOOPBACK`; port 0 takes any free one. Raises :class:`PreviewError`."""
    value = text.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    elif value.isdigit():
        host, sep, port = "", ":", value
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise PreviewError(f"--serve {text!r}: give [HOST:]PORT, e.g. 8080 or 127.0.0.1:8080 (port 0-65535)")
    return host or LOOPBACK, int(port)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may well resolve to a LAN address
        return False


class _HttpServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose connection threads (and their sockets) are tracked, so that
    :meth:`PreviewServer.close` can end and join them."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], preview: PreviewServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.preview = preview
        self.connections: dict[threading.Thread, socket.socket] = {}
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: its getfqdn() can wait on DNS
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self._serve_one, args=(request, client_address),
                                  name="preview connection", daemon=True)
        with self.connections_lock:
            self.connections[thread] = request
        thread.start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("preview: connection from %s failed", client_address, exc_info=True)


class PreviewServer:
    """Listens on ``settings.address`` from construction on (so a busy port fails before the model
    loads), serves once :meth:`open_sink` has made the pipeline's :class:`PreviewSink`; :meth:`close` (also
    called by the sink's ``close``) shuts everything down. Raises :class:`PreviewError`."""

    def __init__(self, settings: PreviewConfig) -> None:
        self.settings = settings
        host, port = parse_address(settings.address)
        if not settings.public and not is_loopback(host):
            raise PreviewError(f"--serve {settings.address}: {host} is not a loopback address, so other machines "
                               f"could watch; add --serve-public (preview.public: true) to allow it, or serve "
                               f"on 127.0.0.1")
        try:
            check_folder(settings.record_dir, name="recordings (preview.record_dir)")
        except OutputError as exc:
            raise PreviewError(first_line(exc)) from exc
        self.assets = _load_assets()
        self.stop = threading.Event()
        self.viewers = 0
        self._viewers_lock = threading.Lock()
        self.sink: PreviewSink | None = None
        self._serving: threading.Thread | None = None
        self._closed = False
        try:
            self.http = _HttpServer((host, port), self)
        except OSError as exc:
            raise PreviewError(_bind_error(host, port, exc)) from exc
        self.host, self.port = host, int(self.http.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def open_sink(self, output: OutputConfig, class_names: Sequence[str],
                  palette: Sequence[Sequence[int]] | None = None) -> PreviewSink:
        """The pipeline's end of the preview; starts serving. Call once."""
        if self.sink is not None or self._closed:
            raise RuntimeError("PreviewServer.open_sink is called once, before close")
        self.sink = PreviewSink(self.settings, output, class_names, palette, url=self.url, on_close=self.close)
        self._serving = threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.1},
                                         name="preview server", daemon=True)
        self._serving.start()
        log.info("browser preview on %s", self.url)
        return self.sink

    def join_viewer(self) -> bool:
        """Count one more streaming viewer, unless ``max_viewers`` are watching already."""
        with self._viewers_lock:
            if self.viewers >= self.settings.max_viewers:
                return False
            self.viewers += 1
            return True

    def leave_viewer(self) -> None:
        with self._viewers_lock:
            self.viewers -= 1

    def close(self) -> None:
        """Stop serving, end every connection (a stream blocked in a send included) and join the
        threads, each within :data:`JOIN_TIMEOUT_S`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stop.set()
        if self._serving is not None:
            self.http.shutdown()
            self._serving.join(JOIN_TIMEOUT_S)
        self.http.server_close()
        with self.http.connections_lock:
            connections = dict(self.http.connections)
        for connection in connections.values():
            try:
                connection.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked sending to a stalled viewer
            except OSError:
                pass
        for thread in connections:
            thread.join(JOIN_TIMEOUT_S)
        left = [thread.name for thread in (self._serving, *connections) if thread is not None and thread.is_alive()]
        if left:
            log.warning("preview: %d thread(s) did not stop within %g s", len(left), JOIN_TIMEOUT_S)


def _hung_up(connection: socket.socket) -> bool:
    """Whether the client closed its end (readable, with nothing to read); never blocks."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and not connection.recv(1, socket.MSG_PEEK)
    except OSError:
        return True


def _bind_error(host: str, port: int, exc: OSError) -> str:
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"cannot serve the preview on {where}: port {port} is in use; choose another with --serve PORT"
    if exc.errno == errno.EACCES:
        return f"cannot serve the preview on {where}: permission denied (ports below 1024 need privileges)"
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return f"cannot serve the preview on {where}: {host} is not an address of this machine"
    return f"cannot serve the preview on {where}: {exc.strerror or exc}"


def _load_assets() -> dict[str, tuple[bytes, str]]:
    """The page and its assets, read once from the package: ``{url path: (bytes, content type)}``."""
    static = resources.files("app.preview") / "static"
    assets = {}
    for entry in static.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in STATIC_TYPES:
            assets[f"/static/{entry.name}"] = (entry.read_bytes(), STATIC_TYPES[suffix])
    assets["/"] = assets["/static/index.html"]
    return assets


class _Handler(BaseHTTPRequestHandler):
    """One connection: a page or asset, the statistics, the record button, or an MJPEG stream."""

    server: _HttpServer
    server_version = "cellseg-preview"

    def setup(self) -> None:
        self.timeout = self.server.preview.settings.send_timeout_s  # every send and receive on this socket
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        super().setup()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        preview = self.server.preview
        if not self._host_allowed():
            self._send_json(HTTPStatus.FORBIDDEN, {"error": "unknown Host"})
        elif path == "/stream.mjpg":
            self._stream()
        elif path == "/stats":
            sink = preview.sink
            stats = sink.stats() if sink is not None else {}
            self._send(HTTPStatus.OK, json.dumps({**stats, "viewers": preview.viewers}).encode(), "application/json")
        elif path in preview.assets:
            self._send(HTTPStatus.OK, *preview.assets[path])
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:
        if not self._host_allowed():
            self._send_json(HTTPStatus.FORBIDDEN, {"error": "unknown Host"})
            return
        if urlsplit(self.path).path != "/record":
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "POST goes to /record"})
            return
        if self.headers.get_content_type() != "application/json":
            self._send_json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send application/json"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            wanted = json.loads(self.rfile.read(min(length, 1024)) or b"null")
        except ValueError:
            wanted = None
        if not isinstance(wanted, dict) or not isinstance(wanted.get("recording"), bool):
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": 'send {"recording": true} or {"recording": false}'})
            return
        sink = self.server.preview.sink
        if sink is None or self.server.preview.stop.is_set():
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the run has ended"})
            return
        try:
            state = sink.start_recording() if wanted["recording"] else sink.stop_recording()
        except SinkError as exc:
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": first_line(exc)})
            return
        self._send_json(HTTPStatus.OK, state)

    def _host_allowed(self) -> bool:
        """On loopback, only requests for a loopback name: a web page whose own host name was made to
        resolve to 127.0.0.1 (DNS rebinding) must not read the stream or press the record button."""
        if self.server.preview.settings.public:
            return True
        host = urlsplit("//" + (self.headers.get("Host") or "")).hostname or ""
        return is_loopback(host)

    def _stream(self) -> None:
        """Send the newest frame not sent yet, until the run ends or the viewer stops taking them."""
        preview = self.server.preview
        sink = preview.sink
        if sink is None or not preview.join_viewer():
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "too many viewers (preview.max_viewers)"})
            return
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            sent = 0
            while not (preview.stop.is_set() or sink.closed):
                newest = sink.next_jpeg(sent, preview.stop, timeout_s=IDLE_CHECK_S)
                if newest is None:  # no new frame for a while: is the viewer still there?
                    if _hung_up(self.connection):
                        break
                    continue
                sent, jpeg = newest
                self.wfile.write(b"--%s\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n"
                                 % (BOUNDARY.encode(), len(jpeg), jpeg))
        except OSError as exc:  # went away, or stopped reading (timeout): drop this viewer only
            log.debug("preview: viewer %s dropped: %s", self.client_address[0], exc)
        finally:
            preview.leave_viewer()
            self.close_connection = True

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("preview: %s %s", self.address_string(), format % args)
