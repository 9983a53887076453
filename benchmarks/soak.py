"""Benchmark section ``soak`` (on request: ``--sections soak``): memory over a long run, and the cost of
building a long synthetic sequence.

- ``run``: :data:`SOAK_FRAMES` frames of a 32² synthetic source (a :data:`SEQUENCE_FRAMES`-frame
  sequence, looped, unpaced: file semantics, nothing dropped) through the threaded
  :class:`~app.pipeline.runner.Pipeline`: the shipped model's preprocessing, the batching inference
  worker, the overlay, and the GIF and CSV writers. Not the mask PNGs (10⁵ files measure the disk) nor
  the MP4: FFmpeg's MP4 muxer keeps an index entry per frame in memory until the file is closed (about
  70 bytes a frame, a property of non-fragmented MP4), which would hide the pipeline's own figure. The
  model is replaced by :class:`ThresholdBackend`: a model's memory is allocated at warm-up and then
  steady, while its time (milliseconds per call even at 32² on a CPU) would stretch the run to many
  minutes; what a soak looks for is memory that the pipeline itself keeps per frame. RSS (resident set
  size, ``/proc/self/statm``) is read while it runs, when 10 %, 50 % and 100 % of the frames have been
  written; ``growth_mb`` is RSS at 100 % minus RSS at 10 % (the first 10 % are the warm-up: allocator
  pools, queues and the statistics' samples fill). Target: ≤ :data:`GROWTH_MB_TARGET` MB.
- ``build``: a :data:`BUILD_FRAMES`-frame 32² synthetic sequence built in a fresh process: seconds, and
  the process's peak RSS, imports included. Targets: < :data:`BUILD_S_TARGET` s, < :data:`BUILD_MB_TARGET` MB.

MB = 10⁶ bytes. Frame counts are arguments of :func:`run_section` (the tests run a small one).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from benchmarks.workload import Context

SOAK_FRAMES = 100_000
SEQUENCE_FRAMES = 500
SOAK_CELLS = 2  # cells and debris particles in the soak's frames: rendering costs ~70 µs per body in view
BUILD_FRAMES = 20_000
SIZE = 32
CHECKPOINTS = (0.1, 0.5, 1.0)
GROWTH_MB_TARGET = 5.0
BUILD_S_TARGET = 5.0
BUILD_MB_TARGET = 500.0
_SECONDS_PER_FRAME = 2e-3
_REPO = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    """This process's resident set size now (MB); its peak where ``/proc`` is missing (not Linux)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MB): ``VmHWM`` where ``/proc`` has it (``ru_maxrss``
    would count the parent's memory too: Linux carries it over fork and exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB elsewhere


class ThresholdBackend:
    """Stand-in model: class 1 where a frame's first channel is above its mean. ``predict``: N×C×H×W
    float32 -> N×H×W uint8; keeps no state between calls."""

    name = "threshold"
    device = "cpu"

    def warmup(self, shape: tuple[int, ...], iters: int = 2) -> None:
        pass

    def predict(self, batch: np.ndarray) -> np.ndarray:
        first = batch[:, 0]
        return (first > first.mean(axis=(1, 2), keepdims=True)).astype(np.uint8)


def measure_build(frames: int, size: int = SIZE) -> dict[str, Any]:
    """Build a ``frames``-frame classic sequence at ``size``² in this process: seconds and peak RSS (MB)."""
    from app.config import SynthConfig
    from app.synthesis import make_sequence

    before = rss_mb()
    start = time.perf_counter()
    sequence = make_sequence(SynthConfig(size=size, frames=frames))
    seconds = time.perf_counter() - start
    sequence.frame(frames - 1)
    return {"frames": frames, "size": size, "seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


def _build_in_fresh_process(frames: int) -> dict[str, Any]:
    code = f"import json; from benchmarks.soak import measure_build; print(json.dumps(measure_build({frames})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=_REPO, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"building {frames} synthetic frames failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_section(ctx: Context, frames: int = SOAK_FRAMES, build_frames: int = BUILD_FRAMES) -> dict[str, Any]:
    """Returns ``run`` (``frames``, ``seconds``, ``fps``, ``rss`` = [{``percent``, ``frames``, ``rss_mb``,
    ``elapsed_s``}], ``growth_mb``, ``slope_bytes_per_frame``, ``peak_rss_mb``, ``frames_dropped`` and
    the pipeline's per-stage ``stages``) and ``build`` (``frames``, ``size``, ``seconds``,
    ``rss_before_mb``, ``peak_rss_mb``).

    RSS is read while the pipeline runs, after a full garbage collection, at the first progress report
    with at least 10 %, 50 % and 100 % of ``frames`` written; the run goes on for :func:`_tail` more
    frames, so that the last reading comes before anything is closed (closing frees what the writers
    held, which would hide it). ``slope_bytes_per_frame`` is a least-squares fit of RSS against frames
    over every report from 10 % to 100 %: a leak shows there even when allocator noise blurs two readings.
    """
    from app.config import replace
    from app.pipeline.factory import build_inference, build_renderer
    from app.pipeline.runner import Pipeline
    from app.pipeline.sinks import open_sinks
    from app.pipeline.sources import open_source
    from benchmarks.workload import preprocessor

    out = ctx.workdir / "soak"
    out.mkdir(parents=True, exist_ok=True)
    total = frames + _tail(frames)
    synth = {"size": SIZE, "frames": min(SEQUENCE_FRAMES, frames), "generator": "classic", "randomize": False,
             "num_cells": SOAK_CELLS, "num_particles": SOAK_CELLS}
    config = replace(ctx.config, synth=synth, source={"loop": True}, pipeline={"max_frames": total},
                     output={"display": False, "video": "", "gif": str(out / "soak.gif"), "masks_dir": "",
                             "csv": str(out / "soak.csv"), "stats_json": ""})
    meta = ctx.loaded.meta
    ctx.log(f"soak: {frames} frames of {SIZE}² through the threaded pipeline (threshold backend), "
            f"about {estimate_seconds(frames, 0):.0f} s")
    source = open_source("synthetic", config, realtime=False)
    try:
        sinks = open_sinks(config.output, meta.class_names)
    except BaseException:
        source.close()
        raise
    readings: list[dict[str, Any]] = []
    trace: list[tuple[int, float]] = []  # (frames written, RSS MB) at every report: ~10 a second
    peak = rss_mb()
    started = time.perf_counter()

    def progress(done: int, expected: int | None, fps: float) -> None:
        nonlocal peak
        now = rss_mb()
        peak = max(peak, now)
        if CHECKPOINTS[0] * frames <= done <= frames:
            trace.append((done, now))
        if len(readings) < len(CHECKPOINTS) and done >= CHECKPOINTS[len(readings)] * frames:
            gc.collect()
            now = rss_mb()
            percent = round(100 * CHECKPOINTS[len(readings)])
            readings.append({"percent": percent, "frames": done, "rss_mb": now,
                             "elapsed_s": time.perf_counter() - started})
            ctx.log(f"soak: {percent} % ({done} frames): RSS {now:.1f} MB")

    result = Pipeline(source, preprocessor(ctx.loaded, config), build_inference(config, ThresholdBackend()),
                      build_renderer(config, meta.palette), sinks, config.pipeline, progress=progress).run()
    seconds = time.perf_counter() - started
    if result.frames != total or len(readings) < len(CHECKPOINTS):
        raise RuntimeError(f"soak run delivered {result.frames} of {total} frames ({result.stopped})")
    written, resident = np.array(trace, dtype=np.float64).T if len(trace) > 1 else (np.zeros(2), np.zeros(2))
    slope = float(np.polyfit(written, resident, 1)[0]) * 1e6 if np.ptp(written) > 0 else 0.0
    ctx.log(f"soak: building a {build_frames}-frame {SIZE}² synthetic sequence in a fresh process")
    build = _build_in_fresh_process(build_frames)
    ctx.log(f"soak: built in {build['seconds']:.2f} s, peak RSS {build['peak_rss_mb']:.0f} MB")
    return {
        "run": {"frames": frames, "size": SIZE, "backend": ThresholdBackend.name, "seconds": seconds,
                "fps": result.frames / seconds, "rss": readings,
                "growth_mb": readings[-1]["rss_mb"] - readings[0]["rss_mb"], "slope_bytes_per_frame": slope,
                "peak_rss_mb": peak, "frames_dropped": result.frames_dropped,
                "stages": {name: {key: row[key] for key in ("fps", "mean_ms", "p95_ms")}
                           for name, row in result.stats.items()}},
        "build": build,
    }


def _tail(frames: int) -> int:
    """Frames run past ``frames``: a few progress reports' worth (reports come ~10 times a second)."""
    return max(frames // 50, 300)


def estimate_seconds(frames: int = SOAK_FRAMES, build_frames: int = BUILD_FRAMES) -> float:
    """Rough duration: about 2 ms a frame through the pipeline on two busy CPU cores, plus the build."""
    return frames * _SECONDS_PER_FRAME + build_frames * 2e-4 + 3.0


def targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """RSS growth after warm-up, and the long sequence's build time and peak memory."""
    run, build = section["run"], section["build"]
    return [
        {"name": f"soak, {run['frames']} frames of {run['size']}² unpaced: RSS growth after the first 10 % (MB)",
         "measured": round(run["growth_mb"], 2), "required": f"<= {GROWTH_MB_TARGET}",
         "met": run["growth_mb"] <= GROWTH_MB_TARGET},
        {"name": f"building a {build['frames']}-frame {build['size']}² synthetic sequence: seconds",
         "measured": round(build["seconds"], 2), "required": f"< {BUILD_S_TARGET}", "met": build["seconds"] < BUILD_S_TARGET},
        {"name": f"building a {build['frames']}-frame {build['size']}² synthetic sequence: peak RSS (MB)",
         "measured": round(build["peak_rss_mb"], 1), "required": f"< {BUILD_MB_TARGET}",
         "met": build["peak_rss_mb"] < BUILD_MB_TARGET},
    ]
