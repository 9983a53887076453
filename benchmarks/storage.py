"""Read throughput of image sequences: real directories with a cold page cache, and emulated devices.

A *reader* loads frames in order with ``threads`` worker threads (read the file's bytes, then decode
them with ``cv2.imdecode``, which releases the GIL, or parse ``.npy``); at most ``2 × threads`` frames
are in flight, and the consumer stamps each frame as it receives it, in sequence order.

Real directories (``--dirs hdd=/mnt/hdd/seq``) are read with a cold page cache: before every run each
file's cached pages are dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)`` and the eviction is
verified with ``mincore``; the result says when eviction was impossible or did not take effect.

Emulated devices reproduce an HDD or SSD on any machine. Model (one FIFO server per device):

* a request for ``b`` bytes occupies the device for ``latency / queue_depth + b / bandwidth`` —
  the latency part overlaps with up to ``queue_depth - 1`` other requests (SSD channels and
  command queueing: queue_depth 32; an HDD has one head, so its seeks do not overlap: queue_depth
  1), while the bandwidth is shared by all requests;
* a request never completes sooner than ``latency + b / bandwidth`` after it was issued.

So one thread reading one file at a time gets ``1 / (latency + b / bandwidth)`` files/s, and the
device's bound, reached with enough concurrent requests, is ``1 / (latency / queue_depth + b /
bandwidth)``. The file is really read (from the page cache, kept warm on purpose so the real disk does
not count twice) and the reading thread then sleeps until the modelled completion time.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from app.errors import AppError
from benchmarks.timing import repeat_rate

if TYPE_CHECKING:
    from app.config import BenchmarkConfig

FORMATS = {"png": ".png", "jpg": ".jpg", "tiff": ".tiff", "npy": ".npy"}
_EXTENSIONS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".tif": "tiff", ".tiff": "tiff", ".npy": "npy"}
PROFILE_NAMES = ("hdd", "sata_ssd", "nvme")


class StorageError(AppError, ValueError):
    """A directory holds no readable frames, or a profile or format is unknown."""


@dataclass(frozen=True)
class DeviceProfile:
    """Latency (s) and bandwidth (bytes/s) of a device, and how many requests overlap their latency."""

    name: str
    latency_s: float
    bandwidth_bytes_s: float
    queue_depth: int

    def service_s(self, nbytes: float) -> float:
        """Seconds one request occupies the device (its share when the device is saturated)."""
        return self.latency_s / self.queue_depth + nbytes / self.bandwidth_bytes_s

    def request_s(self, nbytes: float) -> float:
        """Seconds a single request takes on an idle device."""
        return self.latency_s + nbytes / self.bandwidth_bytes_s

    def bound_fps(self, nbytes: float, threads: int | None = None) -> float:
        """Files/s the device allows; with ``threads`` readers, at most ``threads`` requests in flight."""
        bound = 1.0 / self.service_s(nbytes)
        if threads is not None:
            bound = min(bound, threads / self.request_s(nbytes))
        return bound

    def describe(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_s * 1e3, "bandwidth_mb_s": self.bandwidth_bytes_s / 1e6,
                "queue_depth": self.queue_depth}


def profiles_from_config(cfg: BenchmarkConfig, names: Iterable[str] | None = None) -> dict[str, DeviceProfile]:
    """The emulated profiles named in ``names`` (default: ``cfg.profiles``) from the benchmark config."""
    profiles = {}
    for name in cfg.profiles if names is None else names:
        if name not in PROFILE_NAMES:
            raise StorageError(f"unknown device profile '{name}'; valid: {', '.join(PROFILE_NAMES)}")
        profiles[name] = DeviceProfile(
            name=name,
            latency_s=getattr(cfg, f"{name}_latency_ms") / 1e3,
            bandwidth_bytes_s=getattr(cfg, f"{name}_bandwidth_mb_s") * 1e6,
            queue_depth=getattr(cfg, f"{name}_queue_depth"),
        )
    return profiles


class Device(Protocol):
    """Something that returns a file's bytes (thread-safe)."""

    def read(self, path: Path) -> bytes: ...


class DirectDevice:
    """Plain reads from whatever disk holds the files."""

    def read(self, path: Path) -> bytes:
        with open(path, "rb") as file:
            return file.read()


class EmulatedDevice:
    """Reads a file for real, then sleeps until the device model says the read completes (thread-safe).

    See the module docstring for the model. ``clock``/``sleep`` are injectable for tests.
    """

    def __init__(self, profile: DeviceProfile, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.profile = profile
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._free_at = 0.0

    def read(self, path: Path) -> bytes:
        nbytes = os.path.getsize(path)
        issued = self._clock()
        with self._lock:
            start = max(issued, self._free_at)
            self._free_at = start + self.profile.service_s(nbytes)
            done = max(self._free_at, issued + self.profile.request_s(nbytes))
        data = DirectDevice().read(path)
        remaining = done - self._clock()
        if remaining > 0:
            self._sleep(remaining)
        return data


def decode(data: bytes, fmt: str) -> np.ndarray:
    """File bytes -> frame (as stored: gray H×W or BGR H×W×3, uint8/uint16)."""
    if fmt == "npy":
        return np.lib.format.read_array(io.BytesIO(data))
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise StorageError(f"cannot decode a {fmt} frame ({len(data)} bytes)")
    return image


def write_frames(frames: Sequence[np.ndarray], directory: Path, fmt: str) -> list[Path]:
    """Write frames as ``directory/NNNNNN.<ext>`` (fsynced, so their pages can be evicted later)."""
    if fmt not in FORMATS:
        raise StorageError(f"unknown frame format '{fmt}'; valid: {', '.join(FORMATS)}")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, frame in enumerate(frames):
        path = directory / f"{index:06d}{FORMATS[fmt]}"
        if fmt == "npy":
            buffer = io.BytesIO()
            np.save(buffer, frame)
            data = buffer.getvalue()
        else:
            params = [cv2.IMWRITE_JPEG_QUALITY, 95] if fmt == "jpg" else []
            ok, encoded = cv2.imencode(FORMATS[fmt], frame, params)
            if not ok:
                raise StorageError(f"cannot encode a frame as {fmt}")
            data = encoded.tobytes()
        with open(path, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        paths.append(path)
    return paths


def sequence_files(directory: Path, limit: int = 0) -> tuple[list[Path], str]:
    """Sorted frames of the most common supported format in ``directory`` (first ``limit`` if > 0)."""
    if not directory.is_dir():
        raise StorageError(f"not a directory: {directory}")
    by_format: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        fmt = _EXTENSIONS.get(path.suffix.lower())
        if fmt is not None and path.is_file():
            by_format.setdefault(fmt, []).append(path)
    if not by_format:
        raise StorageError(f"{directory} holds no {', '.join(sorted(set(_EXTENSIONS)))} frames")
    fmt, paths = max(by_format.items(), key=lambda item: len(item[1]))
    if len(paths) < 2:
        raise StorageError(f"{directory}: need at least 2 frames to measure a rate, found {len(paths)}")
    return (paths[:limit] if limit > 0 else paths), fmt


_libc: Any = None


def _mincore_libc() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _libc = libc
    return _libc


def resident_fraction(paths: Iterable[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (``mincore``); None where it cannot be asked."""
    try:
        libc = _mincore_libc()
    except (OSError, AttributeError):
        return None
    resident = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vector = (ctypes.c_ubyte * pages)()
            failed = libc.mincore(addr, size, vector)
            libc.munmap(addr, size)
        finally:
            os.close(fd)
        if failed:
            return None
        resident += sum(v & 1 for v in vector)
        total += pages
    return resident / total if total else 0.0


def evict_page_cache(paths: Sequence[Path]) -> dict[str, Any]:
    """Drop the files' cached pages; returns ``{"cold": bool|None, "resident_fraction", "note"}``.

    ``cold`` is True when eviction was verified (< 5 % of pages still cached), False when it was not
    possible or not effective, None when it could not be verified.
    """
    if not hasattr(os, "posix_fadvise"):
        return {"cold": False, "resident_fraction": resident_fraction(paths),
                "note": "posix_fadvise is not available on this platform: reads may come from the page cache"}
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    fraction = resident_fraction(paths)
    if fraction is None:
        return {"cold": None, "resident_fraction": None,
                "note": "evicted with posix_fadvise(DONTNEED); mincore unavailable, so not verified"}
    if fraction >= 0.05:
        return {"cold": False, "resident_fraction": fraction,
                "note": f"eviction not effective: {fraction:.0%} of pages still cached (dirty or pinned pages, "
                        "or a filesystem that ignores fadvise)"}
    return {"cold": True, "resident_fraction": fraction, "note": "cold page cache (verified with mincore)"}


def read_sequence(device: Device, paths: Sequence[Path], fmt: str, threads: int,
                  consume: Callable[[np.ndarray], None] | None = None) -> list[float]:
    """Read and decode ``paths`` in order with ``threads`` workers; returns each frame's arrival stamp."""
    if threads < 1:
        raise StorageError("reader threads must be >= 1")

    def load(path: Path) -> np.ndarray:
        return decode(device.read(path), fmt)

    stamps = []
    remaining = iter(paths)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-reader") as pool:
        pending: deque[Future[np.ndarray]] = deque(pool.submit(load, p) for p in islice(remaining, 2 * threads))
        while pending:
            frame = pending.popleft().result()
            stamps.append(time.perf_counter())
            if consume is not None:
                consume(frame)
            following = next(remaining, None)
            if following is not None:
                pending.append(pool.submit(load, following))
    return stamps


def measure_reader(device: Device, paths: Sequence[Path], fmt: str, threads: int, repeats: int, warmup: int,
                   cold: bool) -> dict[str, Any]:
    """Median frames/s and MB/s of one reader configuration; ``cold`` evicts the cache before each run.

    ``cache`` says what the timed runs read from: "cold" (eviction verified), "unverified", "not
    evicted" (with ``cache_note`` saying why), or "warm (emulated device)" when ``cold`` is False.
    """
    cache_states: list[dict[str, Any]] = []

    def before_each() -> None:
        if cold:
            cache_states.append(evict_page_cache(paths))

    rate = repeat_rate(lambda: read_sequence(device, paths, fmt, threads), repeats, warmup,
                       before_each=before_each)
    mean_bytes = float(np.mean([os.path.getsize(p) for p in paths]))
    result = {"format": fmt, "threads": threads, "frames": len(paths), "fps": rate["fps"],
              "fps_runs": rate["fps_runs"], "mb_s": rate["fps"] * mean_bytes / 1e6, "file_mb": mean_bytes / 1e6}
    if cold:
        timed = cache_states[warmup:]
        verdicts = [s["cold"] for s in timed]
        result["cache"] = ("cold" if all(v is True for v in verdicts)
                           else "unverified" if all(v is not False for v in verdicts) else "not evicted")
        result["cache_note"] = next((s["note"] for s in timed if s["cold"] is not True), timed[0]["note"])
    else:
        result["cache"] = "warm (emulated device)"
    return result


def synthetic_frames(size: int, frames: int, seed: int = 0) -> list[np.ndarray]:
    """Interferogram frames (uint8 H×W) from the built-in generator, for the emulated devices."""
    from app.config import SynthConfig
    from app.synthesis.generator import InterferogramSequence

    sequence = InterferogramSequence(SynthConfig(size=size, frames=frames, seed=seed))
    return [sequence.frame(i).image for i in range(frames)]


def run_section(cfg: BenchmarkConfig, dirs: dict[str, Path], workdir: Path | None = None,
                log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The storage section: emulated profiles and the local disk on synthetic frames, plus ``dirs``.

    Returns ``{"frame_size", "frames", "profiles", "results": [...], "dirs": {...}}`` where each
    result row has ``device``, ``kind`` (emulated / disk), ``format``, ``threads``, ``fps``, ``mb_s``,
    ``file_mb``, ``cache`` and, for emulated devices, ``bound_fps`` (the device's), ``bound_fps_threads``
    (with that many readers) and ``ratio`` = fps / bound_fps.
    """
    profiles = profiles_from_config(cfg)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-storage-", dir=workdir) as tmp:
        log(f"storage: rendering {cfg.frames} synthetic {cfg.storage_size}² frames")
        frames = synthetic_frames(cfg.storage_size, cfg.frames)
        for fmt in cfg.storage_formats:
            paths = write_frames(frames, Path(tmp) / fmt, fmt)
            mean_bytes = float(np.mean([os.path.getsize(p) for p in paths]))
            for threads in cfg.reader_threads:
                log(f"storage: local disk (cold cache), {fmt}, {threads} thread(s)")
                row = measure_reader(DirectDevice(), paths, fmt, threads, cfg.repeats, cfg.warmup, cold=True)
                results.append({"device": "local-disk", "kind": "disk", **row})
            for _ in range(2):  # warm the page cache: emulated devices model the disk themselves
                for path in paths:
                    DirectDevice().read(path)
            for name, profile in profiles.items():
                for threads in cfg.reader_threads:
                    log(f"storage: emulated {name}, {fmt}, {threads} thread(s)")
                    row = measure_reader(EmulatedDevice(profile), paths, fmt, threads, cfg.repeats, cfg.warmup,
                                         cold=False)
                    bound = profile.bound_fps(mean_bytes)
                    results.append({"device": name, "kind": "emulated", **row, "bound_fps": bound,
                                    "bound_fps_threads": profile.bound_fps(mean_bytes, threads),
                                    "ratio": row["fps"] / bound})
    for name, directory in dirs.items():
        paths, fmt = sequence_files(directory, cfg.frames)
        for threads in cfg.reader_threads:
            log(f"storage: {name} ({directory}), {fmt}, {threads} thread(s)")
            row = measure_reader(DirectDevice(), paths, fmt, threads, cfg.repeats, cfg.warmup, cold=True)
            results.append({"device": name, "kind": "disk", "path": str(directory), **row})
    return {"frame_size": cfg.storage_size, "frames": cfg.frames,
            "profiles": {name: p.describe() for name, p in profiles.items()},
            "model": "FIFO device: request occupies latency/queue_depth + bytes/bandwidth; "
                     "a request takes at least latency + bytes/bandwidth",
            "results": results}


def reader_gap(section: dict[str, Any], model_fps: dict[str, float], fmt: str = "png") -> dict[str, Any]:
    """How far parallel readers close the gap between emulated devices, for models running at ``model_fps``.

    Per profile: reader fps with one thread and with the best thread count, and for each model rate
    the frame rate of a serial loop (read, then infer: ``1 / (1/reader + 1/model)``) against a
    prefetching pipeline (``min(best reader, model)``).
    """
    gap: dict[str, Any] = {"format": fmt, "model_fps": dict(model_fps), "profiles": {}}
    rows = [r for r in section["results"] if r["kind"] == "emulated" and r["format"] == fmt]
    for name in dict.fromkeys(r["device"] for r in rows):
        mine = sorted((r for r in rows if r["device"] == name), key=lambda r: r["threads"])
        best = max(mine, key=lambda r: r["fps"])
        one = mine[0]["fps"]
        gap["profiles"][name] = {
            "reader_fps_1_thread": one, "reader_fps_best": best["fps"], "best_threads": best["threads"],
            "serial_fps": {label: 1.0 / (1.0 / one + 1.0 / rate) for label, rate in model_fps.items()},
            "prefetch_fps": {label: min(best["fps"], rate) for label, rate in model_fps.items()},
        }
    return gap
