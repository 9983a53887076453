"""Objects and tracking per frame on one CPU core: ours against trackpy and laptrack on the same tracks.

Synthetic tracks: ``objects`` discs (radius 10–20 px) on a random walk (σ = 2.5 px per axis per frame),
each inside its own cell of a grid so that none touch, in ``size``² label maps; each detection is
missing with probability ``miss_probability`` (gaps for the linkers to close). Frame by frame, each
contender runs on the same frame in turn (interleaved, so a noisy machine slows them alike); medians
and minima of per-frame times are reported. Contenders:

- ``objects``: :class:`app.pipeline.objects.ObjectMeasurer` on the label map, without and with a phase image,
  and as the read-out runs it (unwrap, split, background margin and ring), so that the read-out's time
  splits into measurement and tracking;
- ``ours``: :meth:`app.pipeline.tracking.Tracker.update` (overlap events + SciPy LAP linking), online,
  and the same with ``overlap_events=False`` (linking only, like the others);
- ``trackpy Linker``: ``trackpy.linking.Linker.next_level`` on the centroids, online (links only);
- ``laptrack window``: ``LapTrack.predict`` re-run each frame over the last ``gap + 2`` frames, which is
  what online use of a whole-sequence linker costs (and still gives no persistent ids across windows);
- ``laptrack sequence``: one ``LapTrack.predict`` over all frames afterwards, per frame (offline).

Every linker gets the same link distance and gap; ``mota`` / ``id_switches`` (CLEAR-MOT within half the
smallest radius) say whether it tracked the discs. trackpy and laptrack are optional: a missing one
is reported as not installed.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np

from app.config import ObjectsConfig, OpticsConfig
from app.pipeline.frames import Frame, SourceInfo
from app.pipeline.objects import FrameObjects, ObjectMeasurer
from app.pipeline.readout import ReadOut
from app.pipeline.tracking import Tracker
from app.training.tracking_metrics import mot_from_centroids
from benchmarks.hologram import _OneCore

OBJECTS_MS_TARGET = 2.0
TRACKING_MS_TARGET = 3.0
READOUT_MS_TARGET = 3.0  # the figure: tracking plus measurements add at most this per frame
READOUT_METHOD = "read-out as run (ReadOut: objects with phase + Tracker)"
RADIUS_PX = (10.0, 20.0)
STEP_PX = 2.5


def synthetic_tracks(objects: int, frames: int, size: int, miss_probability: float,
                     seed: int) -> Iterator[tuple[np.ndarray, dict[int, tuple[float, float]]]]:
    """Per frame: the H×W uint8 label map and the ground truth ``{disc: (x, y)}`` of the discs drawn."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(objects)))
    cell = size / side
    cells = np.array([((i + 0.5) * cell, (j + 0.5) * cell) for j in range(side) for i in range(side)][:objects])
    radius = rng.uniform(*RADIUS_PX, objects)
    reach = np.maximum(cell / 2 - radius - 3, 0.0)[:, None]
    offset = np.zeros((objects, 2))
    for _ in range(frames):
        offset = np.clip(offset + rng.normal(0.0, STEP_PX, offset.shape), -reach, reach)
        centres = cells + offset
        shown = rng.random(objects) >= miss_probability
        labels = np.zeros((size, size), np.uint8)
        for (x, y), r in zip(centres[shown], radius[shown], strict=True):
            cv2.circle(labels, (round(x), round(y)), round(r), 1, -1)
        yield labels, {int(k): (float(x), float(y)) for k, (x, y) in zip(np.flatnonzero(shown), centres[shown], strict=True)}


def _trackpy() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trackpy.linking.linking import Linker
    except ImportError:
        return None
    return Linker


def _laptrack() -> Any:
    try:
        from laptrack import LapTrack
    except ImportError:
        return None
    return LapTrack


class _TrackpyOnline:
    """trackpy's online linker, one ``next_level`` per frame; ids per centroid."""

    def __init__(self, linker_class: Any, max_distance: float, gap: int) -> None:
        self.linker = linker_class(search_range=max_distance, memory=gap)
        self.started = False

    def __call__(self, xy: np.ndarray, frame: int) -> list[int]:
        step = self.linker.next_level if self.started else self.linker.init_level
        step(xy, frame)
        self.started = True
        return list(self.linker.particle_ids)


class _LaptrackWindow:
    """laptrack re-run over the last ``gap + 2`` frames each frame (no ids kept: cost only)."""

    def __init__(self, laptrack: Any, window: int) -> None:
        self.laptrack = laptrack
        self.window = window
        self.recent: list[np.ndarray] = []

    def __call__(self, xy: np.ndarray, frame: int) -> None:
        self.recent = [*self.recent[-(self.window - 1):], xy[:, ::-1]]
        self.laptrack.predict(self.recent)


def _make_laptrack(laptrack_class: Any, max_distance: float, gap: int) -> Any:
    return laptrack_class(cutoff=max_distance**2, gap_closing_cutoff=max_distance**2,
                          gap_closing_max_frame_count=gap, splitting_cutoff=False, merging_cutoff=False)


def _laptrack_ids(laptrack: Any, coords: list[np.ndarray]) -> list[dict[int, tuple[float, float]]]:
    """Whole-sequence laptrack: per frame ``{track id: (x, y)}``."""
    import pandas as pd

    rows = [(t, y, x) for t, xy in enumerate(coords) for x, y in xy]
    table = pd.DataFrame(rows, columns=["frame", "y", "x"])
    tracks, _, _ = laptrack.predict_dataframe(table, ["y", "x"], only_coordinate_cols=False)
    frames: list[dict[int, tuple[float, float]]] = [{} for _ in coords]
    for frame, track, x, y in tracks[["frame", "track_id", "x", "y"]].itertuples(index=False):
        frames[int(frame)][int(track)] = (float(x), float(y))
    return frames


def _row(method: str, seconds: list[float], online: bool, score: Any = None, note: str = "") -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "online": online, "frames_timed": len(seconds),
                           "ms_per_frame": 1000.0 * statistics.median(seconds), "ms_min": 1000.0 * min(seconds)}
    if score is not None:
        row.update(mota=round(score.mota, 4), id_switches=score.id_switches)
    if note:
        row["note"] = note
    return row


def measure(objects: int = 50, frames: int = 100, size: int = 1024, max_link_distance_px: float = 20.0,
            max_gap_frames: int = 2, miss_probability: float = 0.02, seed: int = 2026,
            log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Per-frame milliseconds of every contender (see the module docstring) on one core.

    Returns ``{"results": [{"method", "online", "ms_per_frame" (median), "ms_min", "frames_timed",
    ["mota", "id_switches"], ["note"]}...], "objects", "frames", "size", "trackpy", "laptrack"}``
    (versions, None when not installed)."""
    measurer = ObjectMeasurer(min_area_px=16, classes=(1,))
    objects_config = ObjectsConfig(max_link_distance_px=max_link_distance_px, max_gap_frames=max_gap_frames)
    readout = ReadOut(OpticsConfig(), objects_config, classes=(1,), fps=25.0)
    info = SourceInfo("synthetic", "synthetic", live=False, fps=25.0)
    tracker = Tracker(max_link_distance_px=max_link_distance_px, max_gap_frames=max_gap_frames)
    linker = Tracker(max_link_distance_px=max_link_distance_px, max_gap_frames=max_gap_frames, overlap_events=False)
    linker_class, laptrack_class = _trackpy(), _laptrack()
    times: dict[str, list[float]] = {"objects": [], "objects + phase": [], "objects as run": [], "ours": [],
                                     "ours linking": [], "read-out": []}
    online: dict[str, Callable[[np.ndarray, int], Any]] = {}
    if linker_class is not None:
        online["trackpy Linker"] = _TrackpyOnline(linker_class, max_link_distance_px, max_gap_frames)
    if laptrack_class is not None:
        online["laptrack window"] = _LaptrackWindow(_make_laptrack(laptrack_class, max_link_distance_px,
                                                                   max_gap_frames), max_gap_frames + 2)
    times.update({name: [] for name in online})
    truth: list[dict[int, tuple[float, float]]] = []
    hypotheses: dict[str, list[dict[int, tuple[float, float]]]] = {"ours": [], "trackpy Linker": []}
    coords: list[np.ndarray] = []
    rng = np.random.default_rng(seed + 1)
    log(f"tracking: {objects} objects, {frames} frames of {size}²")
    with _OneCore():
        for frame, (labels, positions) in enumerate(synthetic_tracks(objects, frames, size, miss_probability, seed)):
            phase = rng.normal(0.0, 0.05, labels.shape).astype(np.float32) + (labels > 0)
            start = time.perf_counter()
            found: FrameObjects = measurer(labels)
            times["objects"].append(time.perf_counter() - start)
            start = time.perf_counter()
            measurer(labels, phase)
            times["objects + phase"].append(time.perf_counter() - start)
            start = time.perf_counter()
            readout.measurer(labels, phase)
            times["objects as run"].append(time.perf_counter() - start)
            xy = found.centroid_xy
            start = time.perf_counter()
            readout(Frame(frame, frame / 25.0, labels, info, phase=phase), labels)
            times["read-out"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ids = tracker.update(found, frame).track_ids
            times["ours"].append(time.perf_counter() - start)
            hypotheses["ours"].append({int(i): tuple(p) for i, p in zip(ids, xy, strict=True)})
            start = time.perf_counter()
            linker.update(found, frame)
            times["ours linking"].append(time.perf_counter() - start)
            for name, step in online.items():
                start = time.perf_counter()
                linked = step(xy, frame)
                times[name].append(time.perf_counter() - start)
                if linked is not None:
                    hypotheses[name].append({int(i): tuple(p) for i, p in zip(linked, xy, strict=True)})
            truth.append(positions)
            coords.append(xy.copy())
        sequence_s = None
        if laptrack_class is not None:
            start = time.perf_counter()
            hypotheses["laptrack sequence"] = _laptrack_ids(_make_laptrack(laptrack_class, max_link_distance_px,
                                                                           max_gap_frames), coords)
            sequence_s = time.perf_counter() - start
    threshold = RADIUS_PX[0] / 2
    score = {name: mot_from_centroids(truth, frames_of, threshold) for name, frames_of in hypotheses.items() if frames_of}
    rows = [_row(READOUT_METHOD, times["read-out"], True,
                 note="what --objects/--tracks/--events run per frame: objects with phase (unwrap, split, "
                      "background ring, margin) and tracking"),
            _row("objects (ObjectMeasurer)", times["objects"], True),
            _row("objects + phase (ObjectMeasurer)", times["objects + phase"], True),
            _row("objects as run (the read-out's ObjectMeasurer: unwrap, split, margin, ring)", times["objects as run"],
                 True),
            _row("ours (Tracker.update: overlaps + SciPy LAP)", times["ours"], True, score["ours"]),
            _row("ours, linking only (overlap_events=False)", times["ours linking"], True)]
    if "trackpy Linker" in times:
        rows.append(_row("trackpy Linker.next_level", times["trackpy Linker"], True, score.get("trackpy Linker")))
    if "laptrack window" in times:
        rows.append(_row(f"laptrack predict, window of {max_gap_frames + 2} frames", times["laptrack window"], True,
                         note="cost of online use only: no ids persist across windows"))
    if sequence_s is not None:
        rows.append(_row("laptrack predict, whole sequence", [sequence_s / frames], False,
                         score["laptrack sequence"], note="one call after the last frame, divided by frames"))
    return {"results": rows, "objects": objects, "frames": frames, "size": size,
            "trackpy": _version("trackpy") if linker_class is not None else None,
            "laptrack": _version("laptrack") if laptrack_class is not None else None}


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    """≤ 2 ms objects and ≤ 3 ms tracking per frame (50 objects, 1024², one core), medians."""
    by_method = {row["method"]: row for row in section["results"]}
    objects_ms = by_method["objects + phase (ObjectMeasurer)"]["ms_per_frame"]
    tracking_ms = by_method["ours (Tracker.update: overlaps + SciPy LAP)"]["ms_per_frame"]
    where = f"{section['objects']} objects, {section['size']}², one CPU core: ms per frame"
    readout_ms = by_method.get(READOUT_METHOD, {}).get("ms_per_frame")
    rows = [] if readout_ms is None else [
        {"name": f"read-out as run (measurements + tracking), {where}", "measured": round(readout_ms, 2),
         "required": f"<= {READOUT_MS_TARGET}", "met": readout_ms <= READOUT_MS_TARGET}]
    return rows + [{"name": f"objects with phase, {where}", "measured": round(objects_ms, 2),
             "required": f"<= {OBJECTS_MS_TARGET}", "met": objects_ms <= OBJECTS_MS_TARGET},
            {"name": f"tracking, {where}", "measured": round(tracking_ms, 2),
             "required": f"<= {TRACKING_MS_TARGET}", "met": tracking_ms <= TRACKING_MS_TARGET}]
