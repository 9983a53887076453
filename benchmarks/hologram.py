"""Benchmark section ``hologram``: off-axis demodulation per frame, ours against qpretrieve, one CPU core.

Contenders run interleaved (one frame each, in turn) on the same frames, so a noisy machine slows them
alike; medians of per-frame times are reported. CPU figures are pinned to one core (process affinity,
OpenCV and PyTorch at one thread, SciPy's FFT at one worker) and restored afterwards. Measured per size:

- ``ours field``: ``OffAxisDemodulator.field`` (the demodulation: rfft2, cropped sideband, ifft2,
  reference division), the issue's ≤ 15 ms at 1024² target;
- ``ours channels``: the whole hologram stage, field plus the model channels resized to the frame;
- ``torch channels``: :class:`app.pipeline.hologram.TorchDemodulator` on the model's device (GPU when present);
- ``qpretrieve``: ``OffAxisHologram(frame).run_pipeline()`` with its defaults (smooth disk filter,
  padding), the field's reference library, when installed; at most ``qpretrieve_frames`` frames.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from app.config import SynthConfig
from app.pipeline.hologram import OffAxisDemodulator, TorchDemodulator
from app.synthesis import make_sequence
from benchmarks.timing import synchronize

FIELD_MS_TARGET = 15.0
TARGET_SIZE = 1024
QPRETRIEVE_FRAMES = 4


def _frames(size: int, count: int) -> list[np.ndarray]:
    seq = make_sequence(SynthConfig(size=size, frames=count, seed=2026, generator="propagated", bit_depth=12))
    return [seq.frame(i).image for i in range(count)]


def _qpretrieve() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import qpretrieve
    except ImportError:
        return None
    return qpretrieve


class _OneCore:
    """Pin this process to one CPU core and one thread per library for the ``with`` block."""

    def __enter__(self) -> _OneCore:
        import torch

        self._affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if self._affinity:
            os.sched_setaffinity(0, {min(self._affinity)})
        self._cv_threads, self._torch_threads = cv2.getNumThreads(), torch.get_num_threads()
        cv2.setNumThreads(1)
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        cv2.setNumThreads(self._cv_threads)
        torch.set_num_threads(self._torch_threads)
        if self._affinity:
            os.sched_setaffinity(0, self._affinity)


def _time_interleaved(contenders: dict[str, Callable[[np.ndarray], Any]], frames: list[np.ndarray],
                      rounds: int, limits: dict[str, int], device: Any) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for frame in frames:
            for name, step in contenders.items():
                if len(times[name]) >= limits.get(name, 1 << 30):
                    continue
                synchronize(device)
                start = time.perf_counter()
                step(frame)
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return times


def run_section(ctx: Any) -> dict[str, Any]:
    """Demodulation timings at ``benchmark.hologram_sizes`` (see the module docstring)."""
    import torch

    bench = ctx.config.benchmark
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qpretrieve = _qpretrieve()
    rows = []
    for size in bench.hologram_sizes:
        frames = _frames(size, max(4, min(bench.frames, 8)))
        ctx.log(f"hologram: demodulation {size}²")
        ours = OffAxisDemodulator()
        gpu = TorchDemodulator(OffAxisDemodulator(), device=device)
        ours.field(frames[0])  # start-up (carrier search, plan, reference) is not per-frame work
        gpu.channels(torch.from_numpy(frames[0].astype(np.float32))[None])
        contenders: dict[str, Callable[[np.ndarray], Any]] = {
            "ours field (NumPy/SciPy)": ours.field,
            "ours channels (NumPy/SciPy)": ours.channels,
            f"torch channels ({device})": lambda f, gpu=gpu: gpu.channels(torch.from_numpy(f.astype(np.float32))[None]),
        }
        if qpretrieve is not None:
            contenders["qpretrieve defaults"] = lambda f: qpretrieve.OffAxisHologram(f).run_pipeline()
        rounds = max(bench.repeats, 1)
        with _OneCore():
            for step in contenders.values():  # warm-up
                step(frames[0])
            times = _time_interleaved(contenders, frames, rounds, {"qpretrieve defaults": QPRETRIEVE_FRAMES},
                                      device)
        for name, values in times.items():
            median = statistics.median(values)
            rows.append({"method": name, "size": size, "ms_per_frame": 1000.0 * median, "fps": 1.0 / median,
                         "frames_timed": len(values),
                         "cores": "GPU" if name.startswith("torch") and device == "cuda" else "1 core"})
    return {"results": rows, "device": device, "qpretrieve": getattr(qpretrieve, "__version__", None)}


def target(section: dict[str, Any]) -> dict[str, Any] | None:
    """The ≤ 15 ms demodulation of a 1024² frame on one core, if it was measured."""
    rows = [r for r in section["results"] if r["method"].startswith("ours field") and r["size"] == TARGET_SIZE]
    if not rows:
        return None
    ms = rows[0]["ms_per_frame"]
    return {"name": f"off-axis demodulation, {TARGET_SIZE}² frame, one CPU core: ms per frame",
            "measured": round(ms, 2), "required": f"<= {FIELD_MS_TARGET}", "met": ms <= FIELD_MS_TARGET}
