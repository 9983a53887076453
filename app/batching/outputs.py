"""Driver side of a batch run: each sequence's outputs, written in frame order and committed atomically,
and the manifest that makes a rerun skip finished sequences.

Layout under ``--out DIR``::

    DIR/NAME/masks/000000.png …   label maps (the same files ``app.replay --masks`` writes)
    DIR/NAME/frames.csv           per-frame statistics (``app.replay --csv``'s columns)
    DIR/NAME/summary.json         frames, skipped frames, fps, nodes, seconds
    DIR/manifest.json             finished sequences: name -> source, fingerprint, frames
    DIR/summary.json              the run: every sequence, failures, frames per node

A sequence is written into ``DIR/.NAME.partial/`` and renamed to ``DIR/NAME/`` once its last frame is
in, then entered in the manifest (written through a temporary name). A crash loses only the sequences
in flight: their ``.partial`` folders are removed by the next run, which skips every sequence the
manifest lists with the same fingerprint and an intact folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from app.files import write_text
from app.pipeline.frames import Frame, SourceInfo
from app.pipeline.sinks import FrameStatsSink, MaskFolderSink, Rendered, close_all

MANIFEST = "manifest.json"


class Manifest:
    """``DIR/manifest.json``: the finished sequences (name -> ``{"uri", "fingerprint", "frames"}``)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / MANIFEST
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self.entries = json.loads(self.path.read_text()).get("sequences", {})

    def finished(self, name: str, fingerprint: str) -> bool:
        entry = self.entries.get(name)
        return bool(entry) and entry["fingerprint"] == fingerprint and (self.path.parent / name / "summary.json").is_file()

    def add(self, name: str, entry: dict[str, Any]) -> None:
        self.entries[name] = entry
        write_text(self.path, json.dumps({"sequences": self.entries}, indent=2, sort_keys=True) + "\n")


def remove_partials(folder: Path) -> list[str]:
    """Delete the ``.NAME.partial`` folders a crashed run left; returns their names."""
    left = sorted(path.name for path in folder.glob(".*.partial") if path.is_dir())
    for name in left:
        shutil.rmtree(folder / name)
    return left


class SequenceWriter:
    """One sequence's outputs. :meth:`add` takes result rows in any order and writes each frame once, in
    frame order (row ``previous`` names the frame before it); :meth:`end` records the end row;
    :meth:`complete` tells when every frame is in; :meth:`commit` finishes the files and moves the folder
    into place; :meth:`discard` removes it."""

    def __init__(self, folder: Path, name: str, uri: str, class_names: list[str], started: float) -> None:
        self.final = folder / name
        self.staging = folder / f".{name}.partial"
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.uri = uri
        self.started = started
        self.info = SourceInfo(uri, "batch", live=False)
        self.sinks = [MaskFolderSink(self.staging / "masks"), FrameStatsSink(self.staging / "frames.csv", class_names)]
        self.written = -1  # index of the last frame written
        self.waiting: dict[int, tuple[int, str, np.ndarray, float, float, str]] = {}  # previous -> row
        self.frames = 0
        self.duplicates = 0
        self.nodes: Counter[str] = Counter()
        self.first_read = float("inf")  # wall clock (s): first frame read .. last frame segmented
        self.last_done = 0.0
        self.ending: dict[str, Any] | None = None

    def add(self, index: int, previous: int, name: str, labels: np.ndarray, read_at: float, done_at: float,
            node: str) -> None:
        """One segmented frame (``name``: its source file name, "" for none; times: wall clock s)."""
        if index <= self.written or previous in self.waiting:
            self.duplicates += 1  # a retried read task delivers its frames again
            return
        self.waiting[previous] = (index, name, labels, read_at, done_at, node)
        while self.written in self.waiting:
            index, name, labels, read_at, done_at, node = self.waiting.pop(self.written)
            frame = Frame(index, read_at - self.started, labels, self.info, name=name or None)
            item = Rendered(frame, labels, labels, (done_at - read_at) * 1000.0)
            for sink in self.sinks:
                sink.write(item)
            self.written = index
            self.frames += 1
            self.nodes[node] += 1
            self.first_read = min(self.first_read, read_at)
            self.last_done = max(self.last_done, done_at)

    def end(self, previous: int, frames_read: int, frames_skipped: int, error: str) -> None:
        self.ending = {"last": previous, "frames_read": frames_read, "frames_skipped": frames_skipped,
                       "error": error}

    @property
    def failed(self) -> str:
        return self.ending["error"] if self.ending else ""

    def complete(self) -> bool:
        return self.ending is not None and (bool(self.failed) or self.written == self.ending["last"])

    def summary(self) -> dict[str, Any]:
        span = self.last_done - self.first_read
        return {"uri": self.uri, "frames": self.frames,
                "frames_skipped": self.ending["frames_skipped"] if self.ending else 0,
                "fps": round(self.frames / span, 3) if self.frames and span > 0 else 0.0,
                "seconds": round(span, 3) if self.frames else 0.0,
                "nodes": dict(self.nodes), "duplicates_dropped": self.duplicates}

    def commit(self) -> dict[str, Any]:
        """Finish the files, write ``summary.json`` and rename the folder into place; returns the summary."""
        failure = close_all(self.sinks)
        if failure is not None:
            raise failure
        summary = self.summary()
        write_text(self.staging / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.final.exists():  # a stale copy the manifest does not list
            shutil.rmtree(self.final)
        os.replace(self.staging, self.final)
        return summary

    def discard(self) -> None:
        close_all(self.sinks)
        shutil.rmtree(self.staging, ignore_errors=True)
