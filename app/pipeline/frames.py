"""What flows between the pipeline's stages: :class:`Frame`, :class:`SourceInfo` and the end-of-stream
marker :data:`END_OF_STREAM` (a typed singleton, never ``None``). Imports nothing from the project."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""Image files an image-sequence source reads (lower case)."""


class EndOfStream:
    """Type of the end-of-stream marker; use the singleton :data:`END_OF_STREAM`."""

    _instance: EndOfStream | None = None

    def __new__(cls) -> EndOfStream:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "END_OF_STREAM"


END_OF_STREAM = EndOfStream()


@dataclass(frozen=True)
class SourceInfo:
    """What a source is: ``kind`` (camera/video/stream/images/synthetic), policy and size hints.

    ``frame_count`` is an estimate for progress display only (``None`` when unknown or endless).
    ``fps``: the rate the frames were recorded at, when the source says (a video's, the synthetic
    source's ``source.fps``, a TIFF stack's frame interval); ``None`` when unknown. ``pixel_size_um``:
    µm per pixel in the object plane from the file's metadata (OME ``PhysicalSizeX``, ImageJ or TIFF
    resolution tags), ``None`` when it says nothing.
    """

    uri: str
    kind: str
    live: bool
    fps: float | None = None
    frame_count: int | None = None
    pixel_size_um: float | None = None


@dataclass(frozen=True)
class Frame:
    """One captured frame. ``image`` is H×W (gray) or H×W×3 (BGR), uint8 or uint16; never modified.

    ``index`` is the frame's place in its source: an image's position in the sorted file list (a skipped
    unreadable file leaves a gap), a TIFF page's number, a video's or camera's count of frames read.
    ``name``: the image file's name (``000010.png``) for image sequences, ``stack_p003`` for page 3 of
    ``stack.tif``, so outputs can be named after it (:attr:`stem`); None for video, camera, stream and
    synthetic frames.
    ``display``: what the overlay draws on instead of ``image`` when set (H×W uint8, the same size),
    e.g. the quantitative phase of a hologram, attached by the preprocessing stage. ``phase``: the
    hologram's wrapped phase (H×W float32 rad), attached by the preprocessing stage when the object
    read-out measures dry mass (:mod:`app.pipeline.readout`). ``contacts``: the seams between
    touching objects (H×W bool) that a model with a contact class drew, attached by the inference
    stage (:mod:`app.pipeline.inference`); None for other models."""

    index: int
    timestamp: float
    image: np.ndarray
    info: SourceInfo
    display: np.ndarray | None = None
    name: str | None = None
    phase: np.ndarray | None = None
    contacts: np.ndarray | None = None

    @property
    def stem(self) -> str:
        """What outputs for this frame are named after: ``name`` without its image extension
        (``frame3.png`` -> ``frame3``, ``stack_p003`` as it is), or the index as ``000012`` without a name."""
        if self.name is None:
            return f"{self.index:06d}"
        base, dot, suffix = self.name.rpartition(".")
        return base if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES else self.name
