"""Overlay rendering: a frame plus its label map -> a BGR uint8 picture for display and video.

Contract of :meth:`OverlayRenderer.render`: ``image`` is H×W (gray) or H×W×3/4 (BGR/BGRA), uint8 or
uint16 (or float in [0, 1]); ``labels`` is H×W uint8 class ids at the same size. The result is a new
H×W×3 uint8 BGR array; the inputs are never modified. Class colours come from a palette lookup table
(the checkpoint's RGB palette converted to BGR); only pixels whose class is not background (0) are
blended with opacity ``alpha``, so the background keeps the original frame. Optional outlines are the
inner edge of each region (pixels with a lower class, usually background, within ``contour_thickness``
pixels; found by one erosion), painted in the class colour at full opacity; an optional HUD prints fps, latency and dropped frames in the top-left corner.

All work is OpenCV calls on whole arrays (colour-map LUT, compare, addWeighted, masked copy, erode)
into reused scratch buffers: about 2-3 ms for a 1024×1024 frame on one core.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

BACKGROUND = 0


def palette_lut(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """RGB palette (one triple per class) -> 256×1×3 uint8 BGR lookup table for ``cv2.LUT``.

    Class ids beyond the palette (e.g. 255 = ignore) get white.
    """
    lut = np.full((256, 1, 3), 255, np.uint8)
    for index, rgb in enumerate(palette[:256]):
        red, green, blue = (int(c) for c in rgb)
        lut[index, 0] = (blue, green, red)
    return lut


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Any frame -> uint8 H×W×3 BGR for display (always a new array).

    uint16 is contrast-stretched by its own min/max (recorded 10/12/16-bit data rarely fills the
    range); floats are taken as [0, 1]; gray is replicated to three channels; BGRA drops alpha.
    """
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype == np.uint16:
        low, high, _, _ = cv2.minMaxLoc(image if image.ndim == 2 else image.reshape(image.shape[0], -1))
        scale = 255.0 / (high - low) if high > low else 0.0
        image = cv2.convertScaleAbs(image, alpha=scale, beta=-low * scale)
    elif image.dtype != np.uint8:
        image = cv2.convertScaleAbs(np.asarray(image, np.float32), alpha=255.0)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.shape[2] == 3:
        return image.copy()
    raise ValueError(f"cannot display a frame of shape {image.shape}")


@dataclass(frozen=True)
class HudInfo:
    """Numbers shown in the corner: end-to-end fps, capture-to-overlay latency, frames dropped so far."""

    fps: float
    latency_ms: float
    frames_dropped: int

    def text(self) -> str:
        return f"{self.fps:5.1f} fps  {self.latency_ms:5.0f} ms  dropped {self.frames_dropped}"


OVERLAY_BASES = ("auto", "frame")


def picture_of(frame: Any, base: str) -> np.ndarray:
    """What the overlay draws on for ``frame`` (an :class:`app.pipeline.sources.Frame`): its display picture
    (the hologram's phase) with ``base`` auto when there is one, else the frame itself."""
    display = getattr(frame, "display", None)
    return display if base == "auto" and display is not None else frame.image


class OverlayRenderer:
    """Colours a label map over its frame (see the module docstring for the contract).

    ``palette``: RGB triples per class (class 0 = background, never drawn). ``alpha``: opacity of the
    fill. ``contours``: draw outlines ``contour_thickness`` pixels wide. ``hud``: draw :class:`HudInfo`.
    """

    def __init__(self, palette: Sequence[Sequence[int]], *, alpha: float = 0.5, contours: bool = True,
                 contour_thickness: int = 1, hud: bool = True, base: str = "auto", trail_frames: int = 12) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
        if base not in OVERLAY_BASES:
            raise ValueError(f"overlay base must be one of {', '.join(OVERLAY_BASES)}, got '{base}'")
        self.base = base  # auto: a frame's display picture (hologram phase) when it has one; frame: the raw frame
        self.lut = palette_lut(palette)
        self.alpha = float(alpha)
        self.contours = contours
        self.hud = hud
        side = 2 * max(1, contour_thickness) + 1
        self._scratch: dict[str, np.ndarray] = {}
        self._scratch_shape: tuple[int, ...] | None = None
        self._edge_kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))
        self.trail_frames = trail_frames
        self._trails: dict[int, deque[tuple[int, int]]] = {}

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """H×W uint8 labels -> H×W×3 uint8 BGR class colours (new array)."""
        return cv2.applyColorMap(labels, self.lut)

    def _buffers(self, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        # Reused scratch arrays: allocating fresh multi-megabyte temporaries per frame costs as much
        # as the drawing itself (page faults), so only the returned picture is new each call.
        if self._scratch_shape != shape:
            self._scratch = {"colors": np.empty((*shape, 3), np.uint8), "blend": np.empty((*shape, 3), np.uint8),
                             "foreground": np.empty(shape, np.uint8), "eroded": np.empty(shape, np.uint8),
                             "edges": np.empty(shape, np.uint8)}
            self._scratch_shape = shape
        return self._scratch

    def render(self, image: np.ndarray, labels: np.ndarray, hud: HudInfo | None = None,
               readout: Any = None) -> np.ndarray:
        """Frame + labels (+ HUD numbers, + the object read-out: track ids at the centroids, short
        trails, and count / confluence / total dry mass in the HUD) -> new H×W×3 uint8 BGR overlay.
        Not thread-safe (scratch, trails)."""
        if labels.shape != image.shape[:2]:
            raise ValueError(f"labels {labels.shape} and frame {image.shape[:2]} differ in size")
        labels = np.ascontiguousarray(labels, dtype=np.uint8)
        out = to_bgr8(image)
        scratch = self._buffers(labels.shape)
        colors = cv2.applyColorMap(labels, self.lut, dst=scratch["colors"])
        if self.alpha > 0:
            foreground = cv2.compare(labels, BACKGROUND, cv2.CMP_NE, dst=scratch["foreground"])
            blended = cv2.addWeighted(out, 1.0 - self.alpha, colors, self.alpha, 0.0, dst=scratch["blend"])
            cv2.copyTo(blended, foreground, out)
        if self.contours:
            # Inner outline: pixels with a lower class (usually background) within the kernel.
            eroded = cv2.erode(labels, self._edge_kernel, dst=scratch["eroded"])
            edges = cv2.compare(labels, eroded, cv2.CMP_GT, dst=scratch["edges"])
            cv2.copyTo(colors, edges, out)
        if readout is not None:
            self._draw_tracks(out, readout)
        if self.hud and hud is not None:
            draw_hud(out, hud.text() + ("" if readout is None else "  " + readout_text(readout)))
        return out

    def _draw_tracks(self, out: np.ndarray, readout: Any) -> None:
        """Track ids at the centroids and each track's last ``trail_frames`` centroids, in place."""
        scale = max(0.35, min(out.shape[0], out.shape[1]) / 1400.0)
        centroids = readout.objects.centroid_xy
        seen = set()
        for track_id, (x, y) in zip(readout.tracks.track_ids.tolist(), centroids.tolist(), strict=True):
            seen.add(track_id)
            trail = self._trails.setdefault(track_id, deque(maxlen=max(1, self.trail_frames)))
            trail.append((round(x), round(y)))
            if self.trail_frames > 1 and len(trail) > 1:
                cv2.polylines(out, [np.array(trail, np.int32)], False, (0, 255, 255), 1, cv2.LINE_AA)
            cv2.putText(out, str(track_id), (round(x) - 4, round(y) + 4), cv2.FONT_HERSHEY_SIMPLEX, scale,
                        (255, 255, 255), 1, cv2.LINE_AA)
        for gone in set(self._trails) - seen:  # trails of tracks not in this frame fade out with them
            del self._trails[gone]


def readout_text(readout: Any) -> str:
    """The read-out's HUD part: object count, confluence and, with phase, the total dry mass."""
    text = f"{len(readout.objects)} objects  {100.0 * readout.confluence:4.1f}% confluent"
    return text if readout.total_dry_mass_pg is None else f"{text}  {readout.total_dry_mass_pg:.0f} pg"


def draw_hud(image: np.ndarray, text: str) -> None:
    """Draw ``text`` in the top-left corner of a BGR uint8 image, in place, on a dark box."""
    scale = max(0.35, min(image.shape[0], image.shape[1]) / 900.0)
    thickness = 1 if scale < 0.9 else 2
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, int(4 * scale))
    cv2.rectangle(image, (0, 0), (width + 2 * pad, height + baseline + 2 * pad), (0, 0, 0), cv2.FILLED)
    cv2.putText(image, text, (pad, pad + height), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                thickness, cv2.LINE_AA)
