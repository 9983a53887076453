"""One row per track (``--tracks``, ``output.tracks``), written when the run ends."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec
from app.pipeline.sinks.table import TABLE_SUFFIXES, RowWriter

if TYPE_CHECKING:
    from app.config import OutputConfig

COLUMNS = ("track_id", "first_frame", "last_frame", "lifetime_frames", "frames_observed", "mean_speed_um_per_s",
           "dry_mass_first_pg", "dry_mass_last_pg", "dry_mass_change_pg", "parent_track", "merged_from", "end")


def track_row(summary: Any) -> dict[str, Any]:
    """A :class:`~app.pipeline.tracking.TrackSummary` as a table row (None -> empty)."""
    row = {"track_id": summary.track_id, "first_frame": summary.first_frame, "last_frame": summary.last_frame,
           "lifetime_frames": summary.lifetime_frames, "frames_observed": summary.frames_observed,
           "mean_speed_um_per_s": summary.mean_speed_um_per_s, "dry_mass_first_pg": summary.dry_mass_first_pg,
           "dry_mass_last_pg": summary.dry_mass_last_pg, "dry_mass_change_pg": summary.dry_mass_change_pg,
           "parent_track": summary.parent, "merged_from": " ".join(map(str, summary.merged_from)),
           "end": summary.end}
    return {key: "" if value is None else round(value, 6) if isinstance(value, float) else value
            for key, value in row.items()}


class TracksSink:
    """The tracks of the run (first/last frame, lifetime, mean speed in µm/s, dry-mass change, parent
    track of a division) -> a table, written by ``close()`` from the read-out's tracker."""

    def __init__(self, path: str | Path, class_names: Sequence[str]) -> None:
        self._rows = RowWriter(SPEC, path, COLUMNS)
        self.path = self._rows.path
        self.frames = 0
        self._run: Any = None

    def write(self, item: Rendered) -> None:
        if item.readout is None:
            raise SinkError("--tracks needs the object read-out, which this run does not make")
        self._run = item.readout.run
        self.frames += 1

    def close(self) -> None:
        if self._run is not None:
            for summary in self._run.summaries():
                self._rows.put(track_row(summary))
            self._run = None
        self._rows.close()


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> TracksSink:
    return TracksSink(path, class_names)


SPEC = SinkSpec("tracks", "--tracks", "FILE.csv",
                "one row per track at the end: first/last frame, lifetime, mean speed (µm/s), dry-mass change, "
                "parent track of a division", _open, "bench-tracks.csv", suffixes=TABLE_SUFFIXES, streams=True, readout=True)
