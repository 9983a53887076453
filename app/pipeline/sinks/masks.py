"""Label maps as one PNG per frame (``--masks``, ``output.masks_dir``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from app.files import partial_path
from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec

if TYPE_CHECKING:
    from app.config import OutputConfig

class MaskFolderSink:
    """Label maps -> ``FOLDER/000000.png`` … (uint8 class ids, named by frame index), one file each."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create mask folder {self.path}: {exc.strerror or exc}") from exc
        self.frames = 0

    def write(self, item: Rendered) -> None:
        target = self.path / f"{item.frame.index:06d}.png"
        partial = partial_path(target)
        if not cv2.imwrite(str(partial), np.ascontiguousarray(item.labels, dtype=np.uint8)):
            raise SinkError(f"cannot write mask {target}")
        os.replace(partial, target)
        self.frames += 1

    def close(self) -> None:
        """Nothing to finalise: every PNG is complete when ``write`` returns."""


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> MaskFolderSink:
    return MaskFolderSink(path)


SPEC = SinkSpec("masks_dir", "--masks", "DIR", "write label maps as DIR/000000.png ...", _open, "masks")
