"""One way to write a file: under a temporary name beside it, renamed into place only when complete.

A reader, or a crash or Ctrl-C mid-write, never sees a half-written file under the real name; on
failure the temporary file is removed. Every output of the project goes through here: checkpoints,
ONNX graphs, JSON, CSV, and media written by encoders that need a path (they choose the format by the
extension, which the temporary name keeps).

    with atomic_path("run.gif") as partial:      # encoders: write to ``partial``
        cv2.imwriteanimation(str(partial), animation)
    with atomic_open("scores.csv", newline="") as handle:
        handle.write(...)
    write_text("stats.json", text)

Imports nothing from the project.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def partial_path(path: str | Path) -> Path:
    """The temporary name beside ``path`` (``.NAME.partial.EXT``: hidden, same extension)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def commit(partial: Path, path: str | Path) -> None:
    """Move a finished temporary file into place (atomic on one file system)."""
    os.replace(partial, path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write ``path`` through; renamed into place when the block ends
    without an exception, removed otherwise. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        yield partial
        commit(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """``open`` for writing through a temporary name (see :func:`atomic_path`); flushed to disk before
    the rename, so a full disk fails here and not later."""
    with atomic_path(path) as partial:
        with open(partial, mode, newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path) as handle:
        handle.write(text)
