"""Numbers per cell, live: each frame's label map (and hologram phase) -> objects with persistent track
ids, events, and frame totals. Runs in the overlay stage, in frame order, so the overlay can draw the
ids and the sinks (``--objects``, ``--tracks``, ``--events``, ``--plots``) write what it measured.

The phase comes from the hologram stage (:attr:`app.pipeline.frames.Frame.phase`: wrapped, H×W
float32 rad, background ≈ 0). Its sign depends on the microscope's geometry, but a cell always delays
the light (its refractive index is above the medium's), so unless ``optics.phase_sign`` fixes it,
the sign is chosen once per run from the first frame with objects: the one that makes their summed
phase positive (:func:`phase_sign_of`). Objects whose phase nears ±π are unwrapped inside their box
(:func:`app.pipeline.objects.unwrap_in_box`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.config import ObjectsConfig, OpticsConfig
from app.pipeline.frames import Frame
from app.pipeline.objects import FrameObjects, ObjectMeasurer
from app.pipeline.tracking import FrameTracks, Tracker, TrackSummary


@dataclass(frozen=True, eq=False)
class FrameReadout:
    """One frame's read-out. ``time_s``: since the first frame (source frame rate for recorded
    sources, capture clock for live ones); ``confluence``: fraction of the frame covered by objects;
    ``total_dry_mass_pg``: sum over the objects, None without phase."""

    frame: int
    time_s: float
    objects: FrameObjects
    tracks: FrameTracks
    confluence: float
    total_dry_mass_pg: float | None
    run: ReadOut | None = None  # the read-out that made it (its tracker's summaries, for --tracks)

    def time_of(self, frame: int) -> float:
        """Seconds since the first frame at an earlier ``frame`` of the run (a divide or merge event is
        reported a few frames after it happened), at the run's frame rate."""
        rate = self.run.frame_rate if self.run is not None else 1.0
        return self.time_s - (self.frame - frame) / rate


def phase_sign_of(objects: FrameObjects) -> float:
    """+1 or -1: the sign that makes the objects' summed (unwrapped) phase positive. The sum, not the
    pixels: a defocused object's phase rings change sign locally, but its phase integral is kept.
    (Leaving out objects whose wrapped phase nears ±π was tried: a bead of nearly 2π looks like a
    small phase of the other sign, so it still decided wrongly on held-out 4101, and defocused 4100,
    right with the plain sum, went wrong.)"""
    return 1.0 if float(np.sum(objects.integrated_phase_rad_px)) >= 0 else -1.0


SUSPECT_NEGATIVE_FRACTION = 0.5
"""Above this share of objects with negative dry mass, :meth:`ReadOut.sign_warning` speaks up."""


class ReadOut:
    """Label maps (+ phase) of one run, in frame order -> :class:`FrameReadout`. One per run (it holds
    the tracker); used from one thread.

    ``classes``: the model's object classes (1..K-1); ``fps``: the source's frame rate when recorded
    (frame times are index / fps), None for live sources (capture clock); ``pixel_size_origin``: where
    ``optics.pixel_size_um`` came from (``config`` or ``file``), for the record.
    """

    def __init__(self, optics: OpticsConfig, settings: ObjectsConfig, classes: Sequence[int] | None = None,
                 fps: float | None = None, pixel_size_origin: str = "config") -> None:
        self.optics = optics
        self.pixel_size_origin = pixel_size_origin
        self.settings = settings
        self.fps = fps if fps and fps > 0 else None
        self.measurer = ObjectMeasurer(optics, settings.min_area_px, classes, unwrap=True, split=True,
                                       margin_px=settings.mass_margin_px, ring_px=settings.background_ring_px)
        self.tracker = Tracker(settings.max_link_distance_px, settings.max_gap_frames,
                               confirm_frames=settings.division_confirm_frames,
                               max_daughter_area_ratio=settings.max_daughter_area_ratio,
                               max_hidden_frames=settings.max_hidden_frames)
        self.phase_sign: float | None = float(optics.phase_sign) if optics.phase_sign else None
        self.masses_measured = 0  # objects measured with phase so far, and those of negative dry mass
        self.masses_negative = 0
        self._t0: float | None = None
        self._first_index: int | None = None
        self._last = (0, 0.0)  # frames since the first, seconds since the first

    def _time_s(self, frame: Frame) -> float:
        if self._first_index is None:
            self._first_index, self._t0 = frame.index, frame.timestamp
        if self.fps is not None:
            return (frame.index - self._first_index) / self.fps
        return frame.timestamp - (self._t0 or 0.0)

    def _measure(self, labels: np.ndarray, phase: np.ndarray | None, contacts: np.ndarray | None) -> FrameObjects:
        if phase is None:
            return self.measurer(labels, contacts=contacts)
        if self.phase_sign is None:
            objects = self.measurer(labels, phase, contacts=contacts)
            if not len(objects):
                return objects
            self.phase_sign = phase_sign_of(objects)
            if self.phase_sign > 0:
                return objects
        # The sign goes to the measurer, which applies it box by box: no negated copy of the frame.
        return self.measurer(labels, phase, contacts=contacts, phase_sign=self.phase_sign)

    def __call__(self, frame: Frame, labels: np.ndarray) -> FrameReadout:
        time_s = self._time_s(frame)
        self._last = (frame.index - (self._first_index or 0), time_s)
        objects = self._measure(labels, frame.phase, frame.contacts)
        if objects.dry_mass_pg is not None:
            self.masses_measured += len(objects)
            self.masses_negative += int(np.count_nonzero(objects.dry_mass_pg < 0))
        tracks = self.tracker.update(objects, frame.index)
        covered = float(np.sum(objects.area_px)) / labels.size if len(objects) else 0.0
        total = float(np.sum(objects.dry_mass_pg)) if objects.dry_mass_pg is not None else None
        return FrameReadout(frame.index, time_s, objects, tracks, covered, total, self)

    @property
    def frame_rate(self) -> float:
        """Frames per second of the frame times: the source's rate, or for live sources the rate
        measured over the run so far (1 before two frames)."""
        frames, seconds = self._last
        return self.fps or (frames / seconds if frames and seconds > 0 else 1.0)

    def settings_summary(self) -> dict[str, object]:
        """What the read-out measured with, for the ``--stats`` JSON: the optics (and where the pixel
        size came from: ``config`` or the source ``file``), the object settings, the phase sign and the
        share of objects whose dry mass came out negative."""
        return {"optics": dataclasses.asdict(self.optics), "pixel_size_from": self.pixel_size_origin,
                "objects": dataclasses.asdict(self.settings), "phase_sign": self.phase_sign,
                "negative_dry_mass_fraction": self.negative_fraction}

    @property
    def negative_fraction(self) -> float | None:
        """Share of the objects measured with phase whose dry mass is negative (None before any)."""
        return self.masses_negative / self.masses_measured if self.masses_measured else None

    def sign_warning(self) -> str | None:
        """A line for the user when most objects came out with negative dry mass: then the phase sign
        chosen from the first objects was most likely wrong for this microscope."""
        fraction = self.negative_fraction
        if fraction is None or fraction <= SUSPECT_NEGATIVE_FRACTION or self.optics.phase_sign:
            return None
        flipped = -int(self.phase_sign or 1)
        return (f"{100 * fraction:.0f} % of the objects measured have negative dry mass: the phase sign "
                f"chosen from the first objects is likely wrong here; rerun with --set optics.phase_sign={flipped}")

    def summaries(self) -> list[TrackSummary]:
        """Every track of the run so far, speeds in µm/s at :attr:`frame_rate`."""
        return self.tracker.summaries(self.frame_rate, self.optics.pixel_size_um)
