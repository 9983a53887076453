"""Per-frame statistics as CSV or JSON lines (``--csv``, ``output.csv``)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import cv2
import numpy as np

from app.errors import EXIT_FAILURE
from app.files import commit, discard, open_output, require_space
from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec, sink_errors

if TYPE_CHECKING:
    from app.config import OutputConfig

TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson")


class RowWriter:
    """Rows of one table -> CSV (``.csv``) or JSON lines (``.jsonl``, ``.ndjson``), for every table sink.

    A regular file is written under a temporary name and renamed by ``close()`` (none when no row came).
    A FIFO or character device (``/dev/stdout``, a pipe a reader waits on) is written directly, one
    line at a time, in CSV when its name ends in ``.csv`` and JSON lines otherwise; it is never
    replaced. Writing stops with :class:`SinkError` before the disk is full. ``header``: the CSV
    columns, in order (JSON lines use each row's own keys).
    """

    def __init__(self, spec: SinkSpec, path: str | Path, header: Sequence[str]) -> None:
        self.output = spec.check(path)
        self.path = self.output.name
        self.header = list(header)
        self.as_csv = self.output.target.suffix.lower() == ".csv"
        self.rows = 0
        self._broken = False
        with sink_errors(self.output):
            self._file: IO[str] | None = open_output(self.output, "w", newline="")
        self._csv = csv.writer(self._file) if self.as_csv else None
        if self._csv is not None:
            try:
                self._put(self.header)
            except BaseException:
                discard(self.output, self._file)
                raise

    def put(self, row: dict[str, Any]) -> None:
        """Append one row (keys: the header's; missing ones are written empty in CSV)."""
        if self._file is None:
            raise SinkError(f"{self.path} is already closed")
        self._put([row.get(name, "") for name in self.header] if self._csv is not None else row)
        self.rows += 1

    def _put(self, row: list[Any] | dict[str, Any]) -> None:
        assert self._file is not None
        with sink_errors(self.output):
            if not self.output.stream:
                require_space(self.output.target.parent, name=self.path, exit_code=EXIT_FAILURE)
            try:
                if self._csv is not None:
                    self._csv.writerow(row)
                else:
                    self._file.write(json.dumps(row) + "\n")
            except BaseException:
                self._broken = True  # a partial row: the file cannot be finished
                raise

    def close(self) -> None:
        """Finish the file (flush, fsync, rename); with no row written, or after a failed write, leave
        nothing (a stream is only closed). Idempotent."""
        if self._file is None:
            return
        handle, self._file = self._file, None
        if self._broken or not (self.rows or self.output.stream):
            discard(self.output, handle)
            return
        with sink_errors(self.output):
            commit(self.output, handle)


class FrameStatsSink:
    """Per-frame statistics (:class:`RowWriter`): ``frame`` (index), ``time_s`` (capture time in seconds
    after the first row's frame was captured), ``latency_ms`` (capture -> overlay), ``components``
    (connected regions of non-background, 8-connected), then one column per class name with its pixel
    fraction."""

    def __init__(self, path: str | Path, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self._rows = RowWriter(SPEC, path, ["frame", "time_s", "latency_ms", "components", *self.class_names])
        self.path = self._rows.path
        self._first_capture: float | None = None

    @property
    def frames(self) -> int:
        return self._rows.rows

    def row(self, item: Rendered) -> dict[str, Any]:
        labels = item.labels
        counts = np.bincount(labels.ravel(), minlength=len(self.class_names))
        foreground = cv2.compare(labels, 0, cv2.CMP_NE)
        components = cv2.connectedComponents(foreground, connectivity=8)[0] - 1
        if self._first_capture is None:
            self._first_capture = item.frame.timestamp
        row: dict[str, Any] = {"frame": item.frame.index,
                               "time_s": round(item.frame.timestamp - self._first_capture, 6),
                               "latency_ms": round(item.latency_ms, 3), "components": int(components)}
        for index, name in enumerate(self.class_names):
            row[name] = round(float(counts[index]) / labels.size, 6)
        return row

    def write(self, item: Rendered) -> None:
        self._rows.put(self.row(item))

    def close(self) -> None:
        self._rows.close()


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> FrameStatsSink:
    return FrameStatsSink(path, class_names)


SPEC = SinkSpec("csv", "--csv", "FILE",
                "per-frame statistics, .csv or .jsonl (or a FIFO / /dev/stdout, written as it goes): "
                "class fractions, components, latency", _open, "bench.csv", suffixes=TABLE_SUFFIXES,
                streams=True)
