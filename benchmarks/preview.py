"""Benchmark section ``preview`` (on request: ``--sections preview``, or ``python -m benchmarks.preview``):
does the browser preview slow the pipeline?

The threaded pipeline (the shipped model's preprocessing, inference, overlay) replays a PNG sequence
(:data:`FRAMES` frames of ``benchmark.end_to_end_size``²; file semantics, nothing dropped, so its
throughput is as fast as the machine allows) in four conditions:

- ``no preview``: no server at all;
- ``no viewer``: the preview sink and server, nobody watching;
- ``3 viewers``: three MJPEG clients reading every frame they are sent;
- ``1 stalled viewer``: one client with a 4 KiB receive buffer that never reads; ``preview.send_timeout_s``
  is raised to an hour, so it stays connected, its thread blocked in a send, for the whole run (by
  default it would be dropped after 2 s).

The clients run in a separate process (as a browser would), connected before the run starts. Every
round runs each condition once, in an order rotated per round, so a noisy neighbour affects all alike;
``benchmark.warmup`` rounds are discarded and the medians of ``benchmark.repeats`` rounds reported (the
ratio to ``no viewer`` as the median of each round's own ratio), with each run's fps = frames / (last
frame written - first frame captured) (``PipelineResult.throughput_fps``). ``max_unsent_bytes``
(Linux) is the fullest kernel send queue of a run's streams: full for the stalled viewer, whose thread
was then blocked in a send.
Beside it, less sensitive to other work on the machine: the CPU time of this process per frame (all its
threads: the pipeline's and the server's; not the viewers' process) and the 95th percentile of the sinks
stage's time per frame (a viewer that made the pipeline wait would show there first).
Target: a stalled viewer costs at most 5 % (median fps ≥ 0.95 × ``no viewer``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.config import Config
    from benchmarks.workload import Context

CONDITIONS = {"no preview": None, "no viewer": (0, 0), "3 viewers": (3, 0), "1 stalled viewer": (0, 1)}
"""Condition -> (reading viewers, stalled viewers); None: no preview server."""
STALLED_RATIO_TARGET = 0.95
FRAMES = 240
"""Frames a run: several seconds, so that a run outlasts the scheduler noise of a shared machine."""
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "preview.json"
_REPO = Path(__file__).resolve().parent.parent


def watch(url: str, readers: int, stalled: int) -> None:
    """The viewers' process: ``readers`` streams read to the end, ``stalled`` never read (kept open until
    stdin closes). Prints ``ready`` once all are connected, then a JSON line of the bytes and JPEG
    boundaries each reader got."""
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    request = f"GET /stream.mjpg HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    stalled_sockets = []
    for _ in range(stalled):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(request)
        stalled_sockets.append(sock)
    counts = [{"bytes": 0, "frames": 0} for _ in range(readers)]

    def read(sock: socket.socket, count: dict[str, int]) -> None:
        tail = b""
        while chunk := sock.recv(1 << 16):
            count["bytes"] += len(chunk)
            count["frames"] += (tail + chunk).count(b"--frame\r\n")
            tail = chunk[-8:]
        sock.close()

    sockets = [socket.create_connection((host, int(port))) for _ in range(readers)]
    for sock in sockets:
        sock.sendall(request)
    threads = [threading.Thread(target=read, args=pair) for pair in zip(sockets, counts, strict=True)]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    sys.stdin.read()  # the run is over when the parent closes it
    for thread in threads:
        thread.join()
    for sock in stalled_sockets:
        sock.close()
    print(json.dumps(counts), flush=True)


class _Viewers:
    """The viewers' process for one run (:func:`watch`)."""

    def __init__(self, url: str, readers: int, stalled: int) -> None:
        code = f"from benchmarks.preview import watch; watch({url!r}, {readers}, {stalled})"
        self.process = subprocess.Popen([sys.executable, "-c", code], cwd=_REPO, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            self.process.kill()
            raise RuntimeError("the viewers' process did not connect")

    def finish(self) -> list[dict[str, int]]:
        """What each reading viewer received (the server has closed their streams)."""
        out, _ = self.process.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else []


class _SendQueues:
    """The largest kernel send queue of any of the server's connections during a run, sampled every
    50 ms (Linux ``TIOCOUTQ``; 0 elsewhere): a full one (about the 128 KiB buffer, doubled by the kernel)
    shows the stalled viewer's thread blocked in a send."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="send queue sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            import fcntl
            import termios
        except ImportError:
            return
        while not self._stop.wait(0.05):
            with self.server.http.connections_lock:
                sockets = list(self.server.http.connections.values())
            for sock in sockets:
                try:
                    queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
                except (OSError, ValueError):  # closed meanwhile
                    continue
                self.largest = max(self.largest, queued)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.largest


def run_section(ctx: Context, frames: int = FRAMES) -> dict[str, Any]:
    """Median fps per condition (``conditions``), each one's ratio to ``no viewer``, per-run figures."""
    from app.config import replace
    from app.pipeline.factory import build_inference, build_renderer, place_hologram_stage
    from app.pipeline.runner import Pipeline
    from app.pipeline.sources import open_source
    from app.preview import PreviewServer
    from benchmarks.workload import preprocessor

    config, bench, meta = ctx.config, ctx.config.benchmark, ctx.loaded.meta
    size, count = bench.end_to_end_size, frames
    folder = ctx.cache.png_folder(size, count)
    run_config = replace(config, source={"uri": str(folder), "loop": False}, pipeline={"max_frames": 0},
                         preview={"address": "127.0.0.1:0", "send_timeout_s": 3600.0,
                                  "record_dir": str(ctx.workdir / "recordings")})
    backend = ctx.backend(config.model.backend, concurrent=True)
    worker = build_inference(config, backend, meta)
    renderer = build_renderer(config, meta.palette)

    def run(condition: str) -> dict[str, Any]:
        viewers = CONDITIONS[condition]
        preprocess = preprocessor(ctx.loaded, config)
        place_hologram_stage(preprocess, backend)
        server = watching = sampler = None
        sinks = []
        try:
            if viewers is not None:
                server = PreviewServer(run_config.preview)
                sinks.append(server.open_sink(run_config.output, meta.label_names, meta.palette))
                if any(viewers):
                    watching = _Viewers(server.url, *viewers)
                    deadline = time.monotonic() + 10
                    while server.viewers < sum(viewers) and time.monotonic() < deadline:
                        time.sleep(0.01)
            sampler = _SendQueues(server) if server is not None else None
            source = open_source(str(folder), run_config, realtime=False)
            cpu_start = time.process_time()
            result = Pipeline(source, preprocess, worker, renderer, sinks, run_config.pipeline).run()
            cpu_s = time.process_time() - cpu_start
        finally:
            unsent = sampler.stop() if sampler is not None else 0
            if server is not None:
                server.close()
            received = watching.finish() if watching is not None else []
        if result.interrupted:
            raise KeyboardInterrupt
        if result.frames != count:
            raise RuntimeError(f"{condition}: {result.frames} of {count} frames ({result.stopped})")
        return {"fps": result.throughput_fps, "steady_fps": result.fps, "cpu_ms_per_frame": 1000.0 * cpu_s / count,
                "sinks_p95_ms": result.stats["sinks"]["p95_ms"], "viewers_received": received,
                "max_unsent_bytes": unsent}

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONDITIONS}
    rounds = bench.warmup + bench.repeats
    names = list(CONDITIONS)
    for index in range(rounds):
        timed = index >= bench.warmup
        order = names[index % len(names):] + names[:index % len(names)]
        ctx.log(f"preview: round {index + 1}/{rounds}{'' if timed else ' (warm-up)'}: {', '.join(order)}")
        for name in order:
            measured = run(name)
            if timed:
                runs[name].append(measured)
    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    def paired(name: str) -> float:  # runs of one round are seconds apart: slow drifts in load cancel
        return statistics.median(run["fps"] / ref["fps"] for run, ref in zip(runs[name], runs["no viewer"], strict=True))

    reference = median("no viewer", "fps")
    return {"size": size, "frames": count, "backend": config.model.backend, "rounds": bench.repeats,
            "warmup_rounds": bench.warmup, "max_fps": config.preview.max_fps,
            "conditions": {name: {"median_fps": median(name, "fps"),
                                  "ratio_to_no_viewer": median(name, "fps") / reference,
                                  "paired_ratio_to_no_viewer": paired(name),
                                  "median_cpu_ms_per_frame": median(name, "cpu_ms_per_frame"),
                                  "median_sinks_p95_ms": median(name, "sinks_p95_ms"),
                                  "runs": runs[name]} for name in CONDITIONS}}


def targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    ratio = section["conditions"]["1 stalled viewer"]["paired_ratio_to_no_viewer"]
    return [{"name": f"browser preview, {section['size']}² replay: fps with 1 stalled viewer / fps with none "
                     "(median of per-round ratios)",
             "measured": round(ratio, 3), "required": f">= {STALLED_RATIO_TARGET}", "met": ratio >= STALLED_RATIO_TARGET}]


def estimate_seconds(config: Config, seconds_per_frame: float) -> float:
    """Rounds × conditions × (frames at ``seconds_per_frame`` + start-up)."""
    bench = config.benchmark
    return (bench.warmup + bench.repeats) * len(CONDITIONS) * (FRAMES * seconds_per_frame + 1.0)


def to_markdown(section: dict[str, Any]) -> str:
    from benchmarks.report import table

    rows = [[name, entry["median_fps"], entry["paired_ratio_to_no_viewer"], entry["median_cpu_ms_per_frame"],
             entry["median_sinks_p95_ms"]] for name, entry in section["conditions"].items()]
    return (f"Browser preview, {section['size']}² PNG replay, {section['frames']} frames a run, {section['backend']}, "
            f"medians of {section['rounds']} interleaved rounds:\n\n"
            + table(["condition", "fps", "fps / no viewer (per round)", "CPU ms / frame (this process)", "sinks p95 ms"],
                    rows))


def main(argv: list[str] | None = None) -> int:
    from app.cli import Parser, add_config_arguments, main_of

    parser = Parser(prog="python -m benchmarks.preview", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--json", metavar="FILE", type=Path, default=DEFAULT_JSON,
                        help=f"where to write the results (default {DEFAULT_JSON.relative_to(_REPO)})")
    parser.add_argument("--frames", type=int, default=FRAMES, metavar="N", help=f"frames a run (default {FRAMES})")
    parser.add_argument("--quick", action="store_true", help="256² frames, 3 rounds after 1 warm-up")
    add_config_arguments(parser)
    command = "python -m benchmarks.preview " + shlex.join(sys.argv[1:] if argv is None else argv)
    return main_of("benchmarks.preview", parser, lambda args: _run(args, command), argv)


def _run(args: argparse.Namespace, command: str) -> int:
    from app.cli import config_from_args
    from app.config import load_config
    from benchmarks.machine import machine_info
    from benchmarks.report import write_json
    from benchmarks.workload import Context, FrameCache, load_model

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    quick = ("benchmark.end_to_end_size=256", "benchmark.repeats=3", "benchmark.warmup=1")
    config = load_config(args.config, (*quick, *args.overrides)) if args.quick else config_from_args(args)
    loaded = load_model(config)
    log(f"preview benchmark: model {loaded.label}")
    with tempfile.TemporaryDirectory(prefix="cellseg-preview-bench-") as scratch:
        ctx = Context(config, loaded, FrameCache(Path(scratch)), Path(scratch), log)
        section = run_section(ctx, args.frames)
    result = {"command": command, "machine": machine_info(), "weights": loaded.describe(),
              "config": {name: dataclasses.asdict(getattr(config, name)) for name in ("benchmark", "model", "preview")},
              "preview": section, "targets": targets(section), "duration_s": time.perf_counter() - started}
    write_json(args.json, result)
    print(to_markdown(section))
    for target in result["targets"]:
        print(f"\n{target['name']}: {target['measured']} (required {target['required']}): "
              f"{'met' if target['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
