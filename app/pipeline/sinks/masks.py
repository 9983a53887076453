"""Label maps as one PNG per frame (``--masks``, ``output.masks_dir``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from app.files import write_bytes
from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec, sink_errors

if TYPE_CHECKING:
    from app.config import OutputConfig


class MaskFolderSink:
    """Label maps -> one PNG per frame (uint8 class ids), named after the source frame (its
    :attr:`~app.pipeline.frames.Frame.stem`): ``frame7.png`` for ``frame7.png`` of an image folder,
    ``stack_p003.png`` for page 3 of ``stack.tif``, ``000012.png`` for frame 12 of a video or camera.
    A name that comes round again (a looping folder) gets the frame index added: ``frame7_000019.png``.

    The folder is checked (a folder, or one that can be made, writable, room on the disk) and created
    when the sink is made. Each PNG is encoded in memory and written through
    :func:`app.files.write_bytes`: room for it checked first, its size on disk checked, then renamed,
    so a full disk stops the run with :class:`SinkError` instead of leaving empty PNGs (``cv2.imwrite``
    reports no such failure). Not fsynced one by one (milliseconds each); every name is complete.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = SPEC.check(folder).name
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create mask folder {self.path}: {exc.strerror or exc}") from exc
        self.frames = 0
        self._named: set[str] = set()  # names of source files used; frame indices never repeat

    def file_name(self, item: Rendered) -> str:
        """The PNG's name for ``item`` (see the class docstring)."""
        frame = item.frame
        if frame.name is None:
            return f"{frame.stem}.png"
        if frame.stem in self._named:
            return f"{frame.stem}_{frame.index:06d}.png"
        self._named.add(frame.stem)
        return f"{frame.stem}.png"

    def write(self, item: Rendered) -> None:
        target = self.path / self.file_name(item)
        ok, png = cv2.imencode(".png", np.ascontiguousarray(item.labels, dtype=np.uint8))
        if not ok:
            raise SinkError(f"cannot encode mask {target}")
        with sink_errors():
            write_bytes(target, png.tobytes(), suffixes=(".png",), fsync=False)
        self.frames += 1

    def close(self) -> None:
        """Nothing to finalise: every PNG is complete when ``write`` returns."""


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> MaskFolderSink:
    return MaskFolderSink(path)


SPEC = SinkSpec("masks_dir", "--masks", "DIR", "write label maps as DIR/NAME.png, NAME the source frame's "
                "(frame7.png, stack_p000.png; 000000.png for a video or camera)", _open, "masks",
                folder=True)
