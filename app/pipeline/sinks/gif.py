"""Animated GIF of the overlays (``--gif``, ``output.gif``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from app.files import partial_path
from app.pipeline.sinks.base import Rendered, SinkError, SinkSpec, prepare_output

if TYPE_CHECKING:
    from app.config import OutputConfig

class GifSink:
    """Overlays -> an animated GIF (``cv2.imwriteanimation``), kept to a sensible size.

    Keeps every ``stride``-th frame, scaled by ``scale``, at most ``max_frames`` of them (held in
    memory, encoded by ``close()``), played back at ``fps``, looping forever.
    """

    def __init__(self, path: str | Path, fps: float = 12.0, stride: int = 2, scale: float = 0.5,
                 max_frames: int = 120) -> None:
        if stride < 1 or scale <= 0 or max_frames < 1 or fps <= 0:
            raise SinkError(f"GIF settings must be positive (stride {stride}, scale {scale}, "
                            f"max_frames {max_frames}, fps {fps})")
        self.path = prepare_output(path)
        self.fps = fps
        self.stride = stride
        self.scale = scale
        self.max_frames = max_frames
        self.frames_seen = 0
        self._frames: list[np.ndarray] = []
        self._closed = False

    @property
    def frames(self) -> int:
        return len(self._frames)

    def write(self, item: Rendered) -> None:
        seen = self.frames_seen
        self.frames_seen += 1
        if seen % self.stride or len(self._frames) >= self.max_frames:
            return
        image = item.overlay
        if self._frames:
            height, width = self._frames[0].shape[:2]
        else:
            height = max(1, round(image.shape[0] * self.scale))
            width = max(1, round(image.shape[1] * self.scale))
        if image.shape[:2] != (height, width):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        else:
            image = image.copy()
        self._frames.append(image)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._frames:
            return
        animation = cv2.Animation()
        animation.frames = self._frames
        animation.durations = [max(10, round(1000.0 / self.fps))] * len(self._frames)
        animation.loop_count = 0
        partial = partial_path(self.path)
        try:
            ok = cv2.imwriteanimation(str(partial), animation)
        except cv2.error as exc:
            partial.unlink(missing_ok=True)
            raise SinkError(f"cannot write GIF {self.path}: {exc}") from exc
        if not ok:
            partial.unlink(missing_ok=True)
            raise SinkError(f"cannot write GIF {self.path}")
        os.replace(partial, self.path)
        self._frames = []


def _open(path: str | Path, output: OutputConfig, class_names: Sequence[str]) -> GifSink:
    return GifSink(path, output.gif_fps, output.gif_stride, output.gif_scale, output.gif_max_frames)


SPEC = SinkSpec("gif", "--gif", "FILE.gif",
                "write an overlay GIF; output.gif_stride/gif_scale/gif_max_frames/gif_fps keep it small",
                _open, "bench.gif")
