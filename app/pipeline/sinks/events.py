"""Track events as JSON lines (``--events``, ``output.events``): enter, leave, divide, merge."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec
from app.pipeline.sinks.table import RowWriter

if TYPE_CHECKING:
    from app.config import OutputConfig


class EventsSink:
    """Every track event, one JSON object per line as it is reported: ``frame`` and ``time_s`` of when it
    happened (a division or merge is reported once certain, a few frames later), ``event`` (enter /
    leave / divide / merge), ``ended`` and ``started`` (lists of track ids)."""

    def __init__(self, path: str | Path, class_names: Sequence[str]) -> None:
        self._rows = RowWriter(SPEC, path, ("frame", "time_s", "event", "ended", "started"))
        self.path = self._rows.path
        self.frames = 0

    def write(self, item: Rendered) -> None:
        readout = item.readout
        if readout is None:
            raise SinkError("--events needs the object read-out, which this run does not make")
        for event in readout.tracks.events:
            self._rows.put({"frame": event.frame, "time_s": round(readout.time_of(event.frame), 6), "event": event.kind,
                            "ended": list(event.ended), "started": list(event.started)})
        self.frames += 1

    def close(self) -> None:
        self._rows.close()


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> EventsSink:
    return EventsSink(path, class_names)


SPEC = SinkSpec("events", "--events", "FILE.jsonl", "track events as JSON lines: enter, leave, divide, merge",
                _open, "bench-events.jsonl", suffixes=(".jsonl", ".ndjson"), streams=True, readout=True)
