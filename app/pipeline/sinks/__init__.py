"""Writers: MP4 video, animated GIF, label-map PNG folder, per-frame statistics table (CSV / JSONL).

:data:`SINKS` is the registry (name -> :class:`~app.pipeline.sinks.base.SinkSpec`); it drives the CLI
output flags, :func:`open_sinks` and the benchmarks. A new sink is one module here with a ``SPEC``
plus one line in :data:`SINKS` (and its ``output.<key>`` path in the config).

Every sink has ``write(item: Rendered)`` and ``close()``. Its path is checked before the first frame
(:func:`check_outputs`, and again when the sink opens: extension, what the path names, folder, free
space; see :mod:`app.files`). Files are written under a temporary name in the destination folder
(``.NAME.partial.EXT``), checked (the video reopened, the GIF's length and trailer, each PNG's size),
fsynced and moved into place with ``os.replace`` by ``close()``, so a file on disk under its real name
is always complete and playable; a symbolic link is followed, a FIFO or device is written directly by
the sinks that can stream (CSV / JSON lines) and refused by the others. ``close()`` is idempotent and
meant to be called in a ``finally``: on Ctrl-C or a failure elsewhere (a disk about to fill included)
the frames written so far still become a valid file. A sink that received no frame, or whose file
could not be finished, leaves no file behind. Failures raise :class:`SinkError` (one line naming the
file). Sinks are used from one thread.

The live window is not a sink here: windows belong to the CLI layer (:mod:`app.cli`), which shows
the newest overlay from the main thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

from app.pipeline.sinks import events, gif, masks, objects, plots, table, tracks, video
from app.pipeline.sinks.base import Rendered, Sink, SinkError, SinkSpec
from app.pipeline.sinks.gif import GifSink
from app.pipeline.sinks.masks import MaskFolderSink
from app.pipeline.sinks.table import FrameStatsSink
from app.pipeline.sinks.video import VIDEO_FOURCCS, VideoSink

if TYPE_CHECKING:
    from app.config import OutputConfig

__all__ = ["SINKS", "VIDEO_FOURCCS", "FrameStatsSink", "GifSink", "MaskFolderSink", "Rendered", "Sink",
           "SinkError", "SinkSpec", "VideoSink", "check_outputs", "close_all", "open_sinks"]

log = logging.getLogger(__name__)

SINKS: Mapping[str, SinkSpec] = MappingProxyType({
    "mp4": video.SPEC,
    "gif": gif.SPEC,
    "masks": masks.SPEC,
    "csv": table.SPEC,
    "objects": objects.SPEC,
    "tracks": tracks.SPEC,
    "events": events.SPEC,
    "plots": plots.SPEC,
})


def check_outputs(output: OutputConfig) -> None:
    """Check every output path the section sets (see :meth:`SinkSpec.check`) without writing anything,
    so a bad one fails (SinkError, exit 2) before the model loads and the first frame is read."""
    for spec in SINKS.values():
        path = getattr(output, spec.config_key)
        if path:
            spec.check(path)


def open_sinks(output: OutputConfig, class_names: Sequence[str]) -> list[Sink]:
    """The file sinks the output section asks for (each registered sink whose path is set), in
    registry order; on failure the ones already open are closed."""
    sinks: list[Sink] = []
    try:
        for spec in SINKS.values():
            path = getattr(output, spec.config_key)
            if path:
                sinks.append(spec.open(path, output, class_names))
    except BaseException:
        close_all(sinks)
        raise
    return sinks


def close_all(sinks: Sequence[Sink]) -> SinkError | None:
    """Close every sink even when some fail; returns the first failure (as SinkError) or None."""
    first: SinkError | None = None
    for sink in sinks:
        try:
            sink.close()
        except Exception as exc:
            if first is None:  # reported by the caller, as the run's one error line
                first = exc if isinstance(exc, SinkError) else SinkError(f"closing {sink.path} failed: {exc}")
            else:  # further failures would otherwise go unseen
                log.error("closing %s failed too: %s", sink.path, exc)
    return first
