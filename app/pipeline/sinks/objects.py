"""One row per object per frame (``--objects``, ``output.objects``): what the read-out measured, with
units in the column names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec
from app.pipeline.sinks.table import TABLE_SUFFIXES, RowWriter

if TYPE_CHECKING:
    from app.config import OutputConfig

COLUMNS = ("frame", "time_s", "track_id", "class", "area_px", "area_um2", "centroid_x_px", "centroid_y_px",
           "equivalent_diameter_um", "eccentricity", "bbox_x_px", "bbox_y_px", "bbox_width_px", "bbox_height_px",
           "mean_phase_rad", "integrated_phase_rad_px", "mean_opd_um", "mean_thickness_um", "dry_mass_pg")
"""The table's columns. The phase columns (from ``mean_phase_rad`` on) are empty without a hologram stage."""

_RENAMED = {"bbox_x": "bbox_x_px", "bbox_y": "bbox_y_px", "bbox_width": "bbox_width_px",
            "bbox_height": "bbox_height_px"}
_DIGITS = 6


def object_rows(item: Rendered, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of one frame's objects (plain values, rounded to 6 significant decimals)."""
    readout = item.readout
    if readout is None:
        raise SinkError("--objects needs the object read-out, which this run does not make")
    rows = []
    for record, track_id in zip(readout.objects.records(), readout.tracks.track_ids.tolist(), strict=True):
        class_id = record.pop("class_id")
        record.pop("object")
        row: dict[str, Any] = {"frame": readout.frame, "time_s": round(readout.time_s, _DIGITS),
                               "track_id": track_id,
                               "class": class_names[class_id] if class_id < len(class_names) else class_id}
        for key, value in record.items():
            if key in COLUMNS or key in _RENAMED:
                row[_RENAMED.get(key, key)] = round(value, _DIGITS) if isinstance(value, float) else value
        rows.append(row)
    return rows


class ObjectsSink:
    """Objects of every frame -> a tidy table (:data:`COLUMNS`), CSV or JSON lines."""

    def __init__(self, path: str | Path, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self._rows = RowWriter(SPEC, path, COLUMNS)
        self.path = self._rows.path
        self.frames = 0

    def write(self, item: Rendered) -> None:
        for row in object_rows(item, self.class_names):
            self._rows.put(row)
        self.frames += 1

    def close(self) -> None:
        self._rows.close()


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> ObjectsSink:
    return ObjectsSink(path, class_names)


SPEC = SinkSpec("objects", "--objects", "FILE.csv",
                "one row per object per frame: track id, area (px, µm²), centroid, diameter, eccentricity, "
                "and with a hologram phase, OPD, thickness and dry mass (pg)", _open, "bench-objects.csv",
                suffixes=TABLE_SUFFIXES, streams=True, readout=True)
