"""Per-frame statistics as CSV or JSON lines (``--csv``, ``output.csv``)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import cv2
import numpy as np

from app.files import partial_path
from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec, prepare_output

if TYPE_CHECKING:
    from app.config import OutputConfig

class FrameStatsSink:
    """Per-frame statistics -> CSV (``.csv``) or JSON lines (any other extension, e.g. ``.jsonl``).

    Columns: ``frame`` (index), ``timestamp`` (capture time, perf_counter s), ``latency_ms``
    (capture -> overlay), ``components`` (connected regions of non-background, 8-connected), then
    one column per class name with its pixel fraction.
    """

    def __init__(self, path: str | Path, class_names: Sequence[str]) -> None:
        self.path = prepare_output(path)
        self.class_names = list(class_names)
        self.as_csv = self.path.suffix.lower() == ".csv"
        self.frames = 0
        self._partial = partial_path(self.path)
        try:
            self._file: IO[str] | None = open(self._partial, "w", newline="")
        except OSError as exc:
            raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self._csv = csv.writer(self._file) if self.as_csv else None
        if self._csv is not None:
            self._csv.writerow(["frame", "timestamp", "latency_ms", "components", *self.class_names])

    def row(self, item: Rendered) -> dict[str, Any]:
        labels = item.labels
        counts = np.bincount(labels.ravel(), minlength=len(self.class_names))
        foreground = cv2.compare(labels, 0, cv2.CMP_NE)
        components = cv2.connectedComponents(foreground, connectivity=8)[0] - 1
        row: dict[str, Any] = {"frame": item.frame.index, "timestamp": round(item.frame.timestamp, 6),
                               "latency_ms": round(item.latency_ms, 3), "components": int(components)}
        for index, name in enumerate(self.class_names):
            row[name] = round(float(counts[index]) / labels.size, 6)
        return row

    def write(self, item: Rendered) -> None:
        if self._file is None:
            raise SinkError(f"{self.path} is already closed")
        row = self.row(item)
        if self._csv is not None:
            self._csv.writerow(row.values())
        else:
            self._file.write(json.dumps(row) + "\n")
        self.frames += 1

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self.frames:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> FrameStatsSink:
    return FrameStatsSink(path, class_names)


SPEC = SinkSpec("csv", "--csv", "FILE",
                "per-frame statistics, .csv or .jsonl: class fractions, components, latency", _open, "bench.csv")
