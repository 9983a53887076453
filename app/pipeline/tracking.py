"""Online tracking: persistent track ids for the objects of each frame, and the events between frames.

Per frame (:meth:`Tracker.update`, a few tenths of a millisecond for 50 objects on one core, see
``benchmarks/tracking.py``):

1. **Linking** by linear assignment (``scipy.optimize.linear_sum_assignment``) between the objects
   and the tracks seen within the last ``max_gap_frames + 1`` frames. The cost of a link is
   ``d / max_link_distance_px + area_weight·|ln(area ratio)| + gap_cost·(frames missed)`` with ``d``
   the distance (px) from the track's last centroid; links longer than ``max_link_distance_px`` are
   not allowed. The most links within that distance win, then the least total cost. Objects left
   over start new tracks; a track missed for more than ``max_gap_frames`` frames in a row ends.
2. **Divisions and merges** are read from overlap with the previous frame's objects (two objects of
   consecutive frames overlap when they share at least ``min_overlap_fraction`` of the smaller one's
   area; it is counted only for the objects of new and of vanished tracks), and only once they have
   lasted, because a segmentation that splits a cell for one frame, or two cells that touch for a few
   frames, must not change anyone's id:
   - a new track that overlaps the previous object of a track P which was linked to another object
     overlapping it too is a daughter candidate of P. Once it has been seen ``confirm_frames``
     times, and if the two are of similar size (at most ``max_daughter_area_ratio`` apart), a
     **divide** event is reported at the frame it appeared, P → (P, daughter): P's id goes on with one
     daughter, the other's track has ``parent`` P. Any other candidate only **enters** (late).
   - a track A not seen this frame whose previous object overlaps an object now linked to track B
     was absorbed by B. If A is not seen again within its gap, it ends with a **merge** event at the
     frame it was absorbed, (A, B) → (B,), instead of leaving; if it reappears it goes on as before.
3. Other new tracks **enter**; other tracks that end **leave** (the event comes at frame
   ``last_frame + max_gap_frames + 1``).

Track ids start at 1 (0 can mean "no track" in an id image) and are never reused. Frame indices must
increase; a jump counts as missed frames. Memory stays bounded by the number of tracks, not frames.

Why SciPy's LAP and not laptrack or trackpy (``benchmarks/tracking.py`` runs all three on the same
tracks, 50 objects): laptrack links whole sequences; it has no per-frame call, and re-running it over a
sliding window costs tens of milliseconds a frame. trackpy's ``Linker`` is online and as fast as the
linking step here (tenths of a millisecond), but it only links centroids: the divisions and merges
need the masks anyway, it has no area term, and it brings pandas and matplotlib (seconds to import)
for what is one ``linear_sum_assignment`` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from app.errors import AppError
from app.pipeline.objects import FrameObjects

ENTER, LEAVE, DIVIDE, MERGE = "enter", "leave", "divide", "merge"
EVENT_KINDS = (ENTER, LEAVE, DIVIDE, MERGE)
ALIVE = "alive"
_NO_LINK = 1e9  # cost of a pair farther apart than the link distance (never kept)
_CANDIDATE_COST = 0.5  # extra link cost of an unconfirmed daughter (a row offset: it only decides contests)


class TrackingError(AppError, ValueError):
    """A tracker setting is out of range, or frames came out of order or changed size."""


@dataclass(frozen=True)
class TrackEvent:
    """Something that happened to tracks at frame ``frame``: the tracks that ``ended`` and ``started``.

    ``enter``: () → (new,); ``leave``: (gone,) → (); ``divide``: (parent,) → (parent, daughter), the
    parent's id going on with one daughter; ``merge``: (absorbed, into) → (into,). Divide and merge
    events are reported when they are certain, a few frames after ``frame`` (see the module docstring)."""

    kind: str
    frame: int
    ended: tuple[int, ...] = ()
    started: tuple[int, ...] = ()

    def record(self) -> dict[str, object]:
        """Plain values for a table: ``frame``, ``event``, ``ended`` and ``started`` (space-separated ids)."""
        return {"frame": self.frame, "event": self.kind, "ended": " ".join(map(str, self.ended)),
                "started": " ".join(map(str, self.started))}


@dataclass(frozen=True, eq=False)
class FrameTracks:
    """The tracker's answer for one frame: ``track_ids`` (n,) int64 aligned with the frame's objects,
    and the ``events`` of this frame."""

    frame: int
    track_ids: np.ndarray
    events: tuple[TrackEvent, ...]


@dataclass(frozen=True)
class TrackSummary:
    """One track over its life. ``lifetime_frames``: last − first + 1 (missed frames included);
    ``mean_speed_um_per_s``: path length between its observations over that time (None for a track
    seen once); dry mass (pg) at its first and last observation and the change, None when no phase
    was measured; ``parent``: the track it divided from; ``merged_from``: the tracks that merged into it;
    ``end``: ``leave``, ``merge`` or ``alive`` (still tracked)."""

    track_id: int
    first_frame: int
    last_frame: int
    lifetime_frames: int
    frames_observed: int
    mean_speed_um_per_s: float | None
    dry_mass_first_pg: float | None
    dry_mass_last_pg: float | None
    dry_mass_change_pg: float | None
    parent: int | None
    merged_from: tuple[int, ...]
    end: str


class _Seen(NamedTuple):
    """One frame's objects as plain Python values, one ``tolist`` per array: the tracks read them
    object by object, and a NumPy scalar per read costs more than the linking itself."""

    xy: list[list[float]]
    area: list[float]
    dry_mass: list[float] | None

    @classmethod
    def of(cls, objects: FrameObjects) -> _Seen:
        masses = objects.dry_mass_pg
        return cls(objects.centroid_xy.tolist(), objects.area_px.astype(np.float64).tolist(),
                   None if masses is None else masses.tolist())


class _Track:
    """Running state of one track (the tracker's own; summaries are made from it)."""

    __slots__ = ("track_id", "first_frame", "last_frame", "frames_observed", "xy", "area", "path_px",
                 "dry_mass_first", "dry_mass_last", "parent", "merged_from", "end")

    def __init__(self, track_id: int, frame: int, parent: int | None = None, merged_from: tuple[int, ...] = ()) -> None:
        self.track_id = track_id
        self.first_frame = self.last_frame = frame
        self.frames_observed = 0
        self.xy = (0.0, 0.0)
        self.area = 1.0
        self.path_px = 0.0
        self.dry_mass_first: float | None = None
        self.dry_mass_last: float | None = None
        self.parent = parent
        self.merged_from = merged_from
        self.end = ALIVE

    def observe(self, frame: int, seen: _Seen, index: int) -> None:
        x, y = seen.xy[index]
        if self.frames_observed:
            self.path_px += math.hypot(x - self.xy[0], y - self.xy[1])
        self.frames_observed += 1
        self.last_frame = frame
        self.xy = (x, y)
        self.area = seen.area[index]
        if seen.dry_mass is not None:
            mass = seen.dry_mass[index]
            self.dry_mass_last = mass
            if self.dry_mass_first is None:
                self.dry_mass_first = mass

    def summary(self, fps: float, pixel_size_um: float) -> TrackSummary:
        duration_s = (self.last_frame - self.first_frame) / fps
        change = (self.dry_mass_last - self.dry_mass_first
                  if self.dry_mass_first is not None and self.dry_mass_last is not None else None)
        return TrackSummary(
            track_id=self.track_id, first_frame=self.first_frame, last_frame=self.last_frame,
            lifetime_frames=self.last_frame - self.first_frame + 1, frames_observed=self.frames_observed,
            mean_speed_um_per_s=self.path_px * pixel_size_um / duration_s if duration_s > 0 else None,
            dry_mass_first_pg=self.dry_mass_first, dry_mass_last_pg=self.dry_mass_last, dry_mass_change_pg=change,
            parent=self.parent, merged_from=self.merged_from, end=self.end)


def shared_pixels(under: FrameObjects, objects: FrameObjects, index: int) -> np.ndarray:
    """(len(under),) int64: pixels object ``index`` of ``objects`` shares with each object of ``under``
    (a frame of the same size). Read inside the object's bounding box; one ``bincount``."""
    box, inside = objects.box_mask(index)
    counts = np.bincount(under.components[box][inside], minlength=under.component_count + 1)
    return counts[under.component_id]


def overlap_areas(previous: FrameObjects, current: FrameObjects) -> np.ndarray:
    """(p, n) int64: pixels object i of ``previous`` shares with object j of ``current`` (same frame size).
    Read inside each current object's bounding box, never over the whole frame."""
    if not len(previous) or not len(current):
        return np.zeros((len(previous), len(current)), np.int64)
    return np.stack([shared_pixels(previous, current, j) for j in range(len(current))], axis=1)


class _Overlaps:
    """Which objects of consecutive frames overlap (share at least ``fraction`` of the smaller one's
    area), counted only for the objects asked about and once each: in a frame where every track is
    linked and none is new, nothing is counted (the full matrix cost half a millisecond at 50 objects).
    ``column(j)``: (p,) bool over the previous objects for current object j; ``row(i)``: (n,) bool over
    the current objects for previous object i."""

    def __init__(self, previous: FrameObjects, current: FrameObjects, fraction: float) -> None:
        self.previous, self.current, self.fraction = previous, current, fraction
        self._columns: dict[int, np.ndarray] = {}

    def column(self, j: int) -> np.ndarray:
        if j not in self._columns:
            shared = shared_pixels(self.previous, self.current, j)
            smaller = np.minimum(self.previous.area_px, self.current.area_px[j])
            self._columns[j] = (shared > 0) & (shared >= self.fraction * smaller)
        return self._columns[j]

    def row(self, i: int) -> np.ndarray:
        # From the columns of the current objects whose boxes meet this one's: an object's pixels are
        # those of its id inside its own box (a split piece's id may hold pixels outside it).
        x, y, w, h = self.previous.bbox[i].tolist()
        boxes = self.current.bbox
        meets = ((boxes[:, 0] < x + w) & (boxes[:, 0] + boxes[:, 2] > x)
                 & (boxes[:, 1] < y + h) & (boxes[:, 1] + boxes[:, 3] > y))
        row = np.zeros(len(self.current), bool)
        for j in np.flatnonzero(meets).tolist():
            row[j] = self.column(j)[i]
        return row


class Tracker:
    """Frame by frame: :class:`FrameObjects` of one frame -> :class:`FrameTracks` (see the module docstring).

    ``max_link_distance_px``: the farthest a centroid may move between two observations of a track;
    ``max_gap_frames``: frames a track may go unseen and still be linked again; ``area_weight``: weight
    of the area change in a link's cost; ``gap_cost``: cost per missed frame, so a track seen in the
    previous frame wins over a lost one at the same distance; ``min_overlap_fraction``: share of the
    smaller mask two objects of consecutive frames must overlap by to count for divisions and merges;
    ``overlap_events``: False skips step 2 (linking only: no divide or merge events); ``confirm_frames``:
    observations a daughter needs before its division is reported; ``max_daughter_area_ratio``: the
    larger daughter may be at most this many times the smaller (cells divide in two near-equal halves;
    budding yeast needs more); ``max_hidden_frames``: how long a track absorbed by another (two cells
    the model draws as one) stays open, hidden, at the position of the track that holds it, so that
    when the pair comes apart it takes the object that comes out of it instead of that object being
    reported as a new daughter of a division; past it the track ends with a ``merge``.
    One instance per stream, from one thread.
    """

    def __init__(self, max_link_distance_px: float = 20.0, max_gap_frames: int = 2, area_weight: float = 0.1,
                 gap_cost: float = 0.1, min_overlap_fraction: float = 0.2, overlap_events: bool = True,
                 confirm_frames: int = 3, max_daughter_area_ratio: float = 2.0, max_hidden_frames: int | None = None) -> None:
        if not max_link_distance_px > 0:
            raise TrackingError(f"max_link_distance_px must be > 0, got {max_link_distance_px}")
        if max_gap_frames < 0:
            raise TrackingError(f"max_gap_frames must be >= 0, got {max_gap_frames}")
        if area_weight < 0 or gap_cost < 0:
            raise TrackingError(f"area_weight and gap_cost must be >= 0, got {area_weight} and {gap_cost}")
        if not 0 < min_overlap_fraction <= 1:
            raise TrackingError(f"min_overlap_fraction must be in (0, 1], got {min_overlap_fraction}")
        self.max_link_distance_px = float(max_link_distance_px)
        self.max_gap_frames = int(max_gap_frames)
        self.area_weight = float(area_weight)
        self.gap_cost = float(gap_cost)
        self.min_overlap_fraction = float(min_overlap_fraction)
        if confirm_frames < 1:
            raise TrackingError(f"confirm_frames must be >= 1, got {confirm_frames}")
        self.overlap_events = bool(overlap_events)
        self.confirm_frames = int(confirm_frames)
        if not max_daughter_area_ratio >= 1:
            raise TrackingError(f"max_daughter_area_ratio must be >= 1, got {max_daughter_area_ratio}")
        self.max_daughter_area_ratio = float(max_daughter_area_ratio)
        self.max_hidden_frames = self.max_gap_frames if max_hidden_frames is None else int(max_hidden_frames)
        if self.max_hidden_frames < self.max_gap_frames:
            raise TrackingError(f"max_hidden_frames must be >= max_gap_frames ({self.max_gap_frames}), "
                                f"got {max_hidden_frames}")
        self._daughters: dict[int, tuple[int, int]] = {}  # candidate daughter -> (parent, frame it appeared)
        self._absorbed: dict[int, tuple[int, int]] = {}  # unseen track -> (track it went into, frame)
        self._open: dict[int, _Track] = {}  # alive tracks, seen or within their gap
        self._closed: list[_Track] = []
        self._next_id = 1
        self._frame: int | None = None
        self._previous: FrameObjects | None = None
        self._previous_ids = np.zeros(0, np.int64)

    def _start(self, frame: int, seen: _Seen, index: int, parent: int | None = None,
               merged_from: tuple[int, ...] = ()) -> int:
        track = _Track(self._next_id, frame, parent, merged_from)
        self._next_id += 1
        track.observe(frame, seen, index)
        self._open[track.track_id] = track
        return track.track_id

    def _close(self, track_id: int, end: str) -> None:
        track = self._open.pop(track_id)
        track.end = end
        self._closed.append(track)

    def _topology(self, frame: int, objects: FrameObjects, track_ids: np.ndarray, new: np.ndarray) -> None:
        """Step 2: note daughter candidates (among the ``new`` objects' tracks) and absorbed tracks."""
        previous = self._previous
        if not self.overlap_events or previous is None or not len(previous) or not len(objects):
            return
        if previous.shape != objects.shape:
            raise TrackingError(f"frame size changed from {previous.shape[1]}×{previous.shape[0]} to "
                                f"{objects.shape[1]}×{objects.shape[0]}; start a new Tracker")
        linked = _Overlaps(previous, objects, self.min_overlap_fraction)
        now = {t: j for j, t in enumerate(track_ids.tolist())}
        for j in new.tolist():
            parents = np.flatnonzero(linked.column(j))
            if len(parents) != 1:
                continue
            parent = int(self._previous_ids[parents[0]])
            sibling = now.get(parent)
            if sibling is not None and sibling != j and linked.column(sibling)[parents[0]]:
                self._daughters[int(track_ids[j])] = (parent, frame)
        for i, track_id in enumerate(self._previous_ids.tolist()):
            if track_id in now or track_id not in self._open:
                continue
            for k in np.flatnonzero(linked.row(i)):
                into = int(track_ids[k])
                fragment_of = self._daughters.get(track_id, (None, 0))[0]
                if into != track_id and into not in self._daughters and into != fragment_of:
                    self._absorbed[track_id] = (into, frame)
                    break

    def _settle(self, frame: int, events: list[TrackEvent]) -> None:
        """Report the divisions that have lasted, and end the tracks out of their gap (merge or leave)."""
        for daughter, (parent, born) in list(self._daughters.items()):
            track = self._open.get(daughter)
            if track is not None and track.frames_observed >= self.confirm_frames and parent in self._open:
                sizes = sorted((track.area, self._open[parent].area))
                if sizes[1] <= self.max_daughter_area_ratio * sizes[0]:
                    track.parent = parent
                    events.append(TrackEvent(DIVIDE, born, (parent,), (parent, daughter)))
                else:  # a piece broke off (or a neighbour came out from under it): no division
                    events.append(TrackEvent(ENTER, born, (), (daughter,)))
                del self._daughters[daughter]
            elif track is None or frame - track.last_frame > self.max_gap_frames or parent not in self._open:
                events.append(TrackEvent(ENTER, born, (), (daughter,)))
                del self._daughters[daughter]
        for track in list(self._open.values()):
            unseen = frame - track.last_frame
            if unseen <= self.max_gap_frames or (unseen <= self.max_hidden_frames and track.track_id in self._absorbed
                                                 and self._absorbed[track.track_id][0] in self._open):
                continue
            into, when = self._absorbed.pop(track.track_id, (None, frame))
            if into is not None and into in self._open:
                self._close(track.track_id, MERGE)
                self._open[into].merged_from += (track.track_id,)
                events.append(TrackEvent(MERGE, when, (track.track_id, into), (into,)))
            else:
                self._close(track.track_id, LEAVE)
                events.append(TrackEvent(LEAVE, frame, (track.track_id,), ()))

    def _link(self, frame: int, objects: FrameObjects, seen: _Seen, track_ids: np.ndarray) -> None:
        """Step 2: linear assignment of the objects without a track to the open tracks."""
        free = np.flatnonzero(track_ids == 0)
        tracks = list(self._open.values())
        if not len(free) or not tracks:
            return
        # Past its gap, a hidden track is looked for where the track that holds it is, at a gap's cost.
        holder = {t.track_id: self._open[into] for t in tracks if frame - t.last_frame > self.max_gap_frames
                  and (into := self._absorbed.get(t.track_id, (None, 0))[0]) in self._open}
        track_xy = np.array([holder[t.track_id].xy if t.track_id in holder else t.xy for t in tracks])
        track_area = np.array([t.area for t in tracks])
        missed = np.array([min(frame - t.last_frame - 1, self.max_gap_frames) for t in tracks], np.float64)
        free_xy = objects.centroid_xy[free]
        distance = np.hypot(track_xy[:, 0, None] - free_xy[None, :, 0], track_xy[:, 1, None] - free_xy[None, :, 1])
        area_change = np.abs(np.log(objects.area_px[free][None, :] / track_area[:, None]))
        # A daughter not yet confirmed loses ties to the track it may have split from (a re-merge).
        unconfirmed = np.array([_CANDIDATE_COST * (t.track_id in self._daughters) for t in tracks])
        cost = (distance / self.max_link_distance_px + self.area_weight * area_change
                + self.gap_cost * missed[:, None] + unconfirmed[:, None])
        cost[distance > self.max_link_distance_px] = _NO_LINK
        rows, cols = linear_sum_assignment(cost)
        kept = cost[rows, cols] < _NO_LINK
        for row, index in zip(rows[kept].tolist(), free[cols[kept]].tolist(), strict=True):
            tracks[row].observe(frame, seen, index)
            track_ids[index] = tracks[row].track_id

    def update(self, objects: FrameObjects, frame: int) -> FrameTracks:
        """Track the objects of frame ``frame`` (greater than the last one given)."""
        if self._frame is not None and frame <= self._frame:
            raise TrackingError(f"frame {frame} after frame {self._frame}: frames must come in increasing order")
        track_ids = np.zeros(len(objects), np.int64)
        seen = _Seen.of(objects)
        self._link(frame, objects, seen, track_ids)
        for track_id in track_ids[track_ids > 0].tolist():
            self._absorbed.pop(track_id, None)  # seen again: it was only hidden
        new = np.flatnonzero(track_ids == 0)
        for j in new.tolist():
            track_ids[j] = self._start(frame, seen, j)
        self._topology(frame, objects, track_ids, new)
        events = [TrackEvent(ENTER, frame, (), (int(track_ids[j]),)) for j in new
                  if int(track_ids[j]) not in self._daughters]
        self._settle(frame, events)
        self._frame, self._previous, self._previous_ids = frame, objects, track_ids
        return FrameTracks(frame, track_ids, tuple(events))

    def summaries(self, fps: float, pixel_size_um: float) -> list[TrackSummary]:
        """Every track so far, ended and open, by id; speeds from ``fps`` (frames/s) and the pixel size (µm)."""
        if not fps > 0 or not pixel_size_um > 0:
            raise TrackingError(f"fps and pixel_size_um must be > 0, got {fps} and {pixel_size_um}")
        tracks = sorted([*self._closed, *self._open.values()], key=lambda t: t.track_id)
        return [track.summary(fps, pixel_size_um) for track in tracks]
