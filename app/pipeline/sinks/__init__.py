"""Writers: MP4 video, animated GIF, label-map PNG folder, per-frame statistics table (CSV / JSONL).

:data:`SINKS` is the registry (name -> :class:`~app.pipeline.sinks.base.SinkSpec`); it drives the CLI
output flags, :func:`open_sinks` and the benchmarks. A new sink is one module here with a ``SPEC``
plus one line in :data:`SINKS` (and its ``output.<key>`` path in the config).

Every sink has ``write(item: Rendered)`` and ``close()``. Files are written under a temporary name in
the destination folder (``.NAME.partial.EXT``) and moved into place with ``os.replace`` by ``close()``,
so a file on disk under its real name is always complete and playable. ``close()`` is idempotent and
meant to be called in a ``finally``: on Ctrl-C or a failure elsewhere the frames written so far still
become a valid file. A sink that received no frame leaves no file behind. Failures raise
:class:`SinkError` (one line). Sinks are used from one thread.

The live window is not a sink here: windows belong to the CLI layer (:mod:`app.cli`), which shows
the newest overlay from the main thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

from app.pipeline.sinks import gif, masks, table, video
from app.pipeline.sinks.base import Rendered, Sink, SinkError, SinkSpec
from app.pipeline.sinks.gif import GifSink
from app.pipeline.sinks.masks import MaskFolderSink
from app.pipeline.sinks.table import FrameStatsSink
from app.pipeline.sinks.video import VIDEO_FOURCCS, VideoSink

if TYPE_CHECKING:
    from app.config import OutputConfig

__all__ = ["SINKS", "VIDEO_FOURCCS", "FrameStatsSink", "GifSink", "MaskFolderSink", "Rendered", "Sink",
           "SinkError", "SinkSpec", "VideoSink", "close_all", "open_sinks"]

log = logging.getLogger(__name__)

SINKS: Mapping[str, SinkSpec] = MappingProxyType({
    "mp4": video.SPEC,
    "gif": gif.SPEC,
    "masks": masks.SPEC,
    "csv": table.SPEC,
})


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
            log.error("closing %s failed: %s", sink.path, exc)
            if first is None:
                first = exc if isinstance(exc, SinkError) else SinkError(f"closing {sink.path} failed: {exc}")
    return first
